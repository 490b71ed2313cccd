"""The Fréchet distance between two Gaussians given by their statistics: FID on the pool features, sFID on the
spatial ones (ADM's ``FIDStatistics.frechet_distance``).

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

ADM takes the trace of the matrix square root with ``scipy.linalg.sqrtm`` (retrying with 1e-6 added to both
diagonals when the product is singular). Here it is the sum of the square roots of the eigenvalues of
sigma1^(1/2) sigma2 sigma1^(1/2), a symmetric matrix with the eigenvalues of sigma1 sigma2: the same trace, from
two symmetric eigendecompositions in float64, real by construction, with no singular case to retry, and on the
evaluation's device. It is several times faster than ``sqrtm`` at ADM's 2048 and 2023 dimensions and about as
fast as torch-fidelity's general eigenvalues of the product, which are complex in general.
"""
from __future__ import annotations

import numpy as np
import torch


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (rounding's negative eigenvalues as 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(first: dict, second: dict, device: str | torch.device = "cpu") -> float:
    """The Fréchet distance between ``{"mu", "sigma"}`` statistics (any float dtypes; computed in float64, on
    ``device``)."""
    if first["mu"].shape != second["mu"].shape:
        raise ValueError(f"statistics of {first['mu'].shape[0]}-d and {second['mu'].shape[0]}-d features")
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(np.asarray(s[k], dtype=np.float64), device=device)
                                for s in (first, second) for k in ("mu", "sigma"))
    root = _sqrt_psd((sigma1 + sigma1.T) / 2)
    product = root @ sigma2 @ root
    trace_covmean = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_covmean)
