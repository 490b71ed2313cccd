"""ADM's Inception Score (``Evaluator.compute_inception_score``), accumulated batch by batch.

The samples, in their order, are cut into consecutive splits of ``split_size`` (ADM: 5000; the last split may
be shorter). In each split, with p_i = softmax(logits_i) over Inception's 1008 classes and q the split's mean of
the p_i, the score is exp(mean_i KL(p_i || q)); the Inception Score is the mean of the splits' scores. Since
mean_i KL(p_i || q) = (sum_i sum_c p_ic log p_ic - sum_c n q_c log q_c) / n, a split needs only its count, the
sum of p log p and the sum of p, so 50K samples never sit in memory. (torch-fidelity's IS differs: it shuffles
the samples and cuts them into a fixed number of splits.)
"""
from __future__ import annotations

import numpy as np
import torch

#: ADM's split size.
ADM_SPLIT_SIZE = 5000


class InceptionScore:
    """Add logits (B, K) in sample order with ``add``; ``result()`` gives (mean, std) over the splits' scores."""

    def __init__(self, split_size: int = ADM_SPLIT_SIZE):
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        self.split_size = split_size
        self.scores: list[float] = []
        self._count, self._sum_plogp, self._sum_p = 0, 0.0, None

    def add(self, logits: torch.Tensor) -> None:
        logits = logits.double()
        while len(logits):
            take = min(len(logits), self.split_size - self._count)
            part, logits = logits[:take], logits[take:]
            log_p = part.log_softmax(dim=1)
            p = log_p.exp()
            self._sum_plogp += float((p * log_p).sum())
            self._sum_p = p.sum(0) if self._sum_p is None else self._sum_p + p.sum(0)
            self._count += take
            if self._count == self.split_size:
                self._close_split()

    def _close_split(self) -> None:
        n, sum_p = self._count, self._sum_p
        kl = (self._sum_plogp - float(torch.special.xlogy(sum_p, sum_p / n).sum())) / n
        self.scores.append(float(np.exp(kl)))
        self._count, self._sum_plogp, self._sum_p = 0, 0.0, None

    def result(self) -> tuple[float, float]:
        """(mean, standard deviation) of the splits' scores, the open last split included."""
        if self._count:
            self._close_split()
        if not self.scores:
            raise ValueError("no logits were added")
        return float(np.mean(self.scores)), float(np.std(self.scores))
