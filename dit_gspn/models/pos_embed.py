"""Fixed 2-D sin-cos positional embeddings with facebookresearch/DiT's layout, for any (h, w) grid."""
from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) embedding: sin of positions * omega, then cos, omega = 10000^(-k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h * w, dim) float32 embedding of a row-major (h, w) token grid, as DiT's ``get_2d_sincos_pos_embed``.

    As in DiT (and MAE), the first half of the channels encodes the column index and the second
    half the row index, computed in float64 and rounded once to float32; for a square grid the
    result equals the ``pos_embed`` stored in the official DiT checkpoints.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a hidden size divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb_cols = _sincos_1d(dim // 2, cols.reshape(-1))
    emb_rows = _sincos_1d(dim // 2, rows.reshape(-1))
    return torch.cat([emb_cols, emb_rows], dim=1).float()
