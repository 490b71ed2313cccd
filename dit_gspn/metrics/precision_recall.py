"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them (its
``ManifoldEstimator`` with k = 3, via ``Evaluator.compute_prec_recall``), in blocks of bounded size.

Each set of feature vectors spans a manifold: the union of balls around its vectors, each ball's squared radius
being the squared distance to the vector's k-th nearest neighbour in its own set, the vector itself counted as
the 0-th (ADM partitions a row of distances that includes the vector's own zero and reads position k). A vector
is inside a manifold if its squared distance to some ball's centre is at most that ball's squared radius.
Precision is the share of samples inside the reference manifold, recall the share of reference vectors inside
the samples' manifold.

Distances are squared Euclidean, ||u||^2 - 2 u.v + ||v||^2 clamped at 0, in float32: ADM computes them so in
float16 first and falls back to float32 for a block with a non-finite value, so its result can differ from
this one by the rare vector within float16's rounding of a radius. The block size (ADM: 10,000 x 10,000) only
bounds memory here: a row block keeps a running k + 1 smallest distances instead of a full row.
"""
from __future__ import annotations

import torch

ADM_NEIGHBOURHOOD = 3


def squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(R, C) squared Euclidean distances between ``rows`` (R, D) and ``cols`` (C, D), float32 (ADM's
    ``_batch_pairwise_distances``)."""
    rows, cols = rows.float(), cols.float()
    distances = (rows * rows).sum(1, keepdim=True) - 2 * rows @ cols.T + (cols * cols).sum(1)[None, :]
    return distances.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = ADM_NEIGHBOURHOOD, block: int = 2048) -> torch.Tensor:
    """Each vector's squared distance to its k-th nearest neighbour in ``features``, itself the 0-th (N,)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"a manifold with k = {k} neighbours needs more than {k} vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for start in range(0, n, block):
        rows = features[start:start + block]
        nearest = None
        for col in range(0, n, block):
            distances = squared_distances(rows, features[col:col + block])
            if nearest is not None:
                distances = torch.cat([nearest, distances], dim=1)
            nearest = distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values
        radii[start:start + block] = nearest[:, k]
    return radii


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = ADM_NEIGHBOURHOOD,
                     block: int = 2048, device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of ``samples`` (N2, D) against ``reference`` (N1, D) feature vectors."""
    reference, samples = reference.to(device), samples.to(device)
    ref_radii, sample_radii = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
    ref_inside = torch.zeros(len(reference), dtype=torch.bool, device=device)
    samples_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for start in range(0, len(reference), block):  # one sweep over the pairs serves both (ADM's evaluate_pr)
        rows = reference[start:start + block]
        for col in range(0, len(samples), block):
            distances = squared_distances(rows, samples[col:col + block])
            ref_inside[start:start + block] |= (distances <= sample_radii[None, col:col + block]).any(1)
            samples_inside[col:col + block] |= (distances <= ref_radii[start:start + block, None]).any(0)
    return float(samples_inside.double().mean()), float(ref_inside.double().mean())
