"""The mean and covariance of feature vectors given in batches, in float64, without keeping the vectors.

FID's statistics are ``np.mean(x, axis=0)`` and ``np.cov(x, rowvar=False)`` (ADM's ``compute_statistics``);
``Moments`` gives the same two for any number of rows from a fixed amount of memory (a mean and a D x D
scatter matrix), and two ``Moments`` merge into the moments of both sets (Chan, Golub and LeVeque's pairwise
update), which is how a reference's resumable chunks are summed. Each batch is centred on its own mean before
its scatter is added, so nothing cancels catastrophically whatever the features' offset.
"""
from __future__ import annotations

import numpy as np
import torch


class Moments:
    """Running count, mean (D,) and scatter sum_i (x_i - mean)(x_i - mean)^T (D, D) of D-dimensional rows."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def add(self, rows: torch.Tensor | np.ndarray) -> None:
        """Add a batch of rows, (n, D)."""
        rows = rows.double().numpy() if torch.is_tensor(rows) else np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {rows.shape}")
        if not len(rows):
            return
        mean = rows.mean(0)
        centred = rows - mean
        self._merge(len(rows), mean, centred.T @ centred)

    def merge(self, other: "Moments") -> None:
        """Add the rows ``other`` summarises."""
        if other.count:
            self._merge(other.count, other.mean, other.scatter)

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def statistics(self) -> dict[str, np.ndarray]:
        """``mu`` (D,) and the unbiased covariance ``sigma`` (D, D), as np.mean and np.cov give them."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return {"mu": self.mean.copy(), "sigma": self.scatter / (self.count - 1)}

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The state as named arrays (``<prefix>count``, ``<prefix>mean``, ``<prefix>scatter``) for an ``.npz``."""
        return {f"{prefix}count": np.int64(self.count), f"{prefix}mean": self.mean,
                f"{prefix}scatter": self.scatter}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "Moments":
        """The ``Moments`` that ``to_arrays(prefix)`` wrote into ``arrays`` (a dict or an open ``.npz``)."""
        moments = cls(arrays[f"{prefix}mean"].shape[0])
        moments.count = int(arrays[f"{prefix}count"])
        moments.mean = np.array(arrays[f"{prefix}mean"], dtype=np.float64)
        moments.scatter = np.array(arrays[f"{prefix}scatter"], dtype=np.float64)
        return moments
