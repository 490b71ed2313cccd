"""The (h, w) token grid that travels with a (B, N, C) token sequence, and its checks."""
from __future__ import annotations

import torch


def check_grid(tokens: torch.Tensor, grid: tuple[int, int], where: str) -> tuple[int, int]:
    """Return (h, w) as ints after checking that ``tokens`` (B, N, C) hold exactly h * w tokens.

    ``where`` names the caller in the error, so that a user knows which module refused the input.
    """
    if tokens.ndim != 3:
        raise ValueError(f"{where}: expected tokens of shape (B, N, C), got shape {tuple(tokens.shape)}")
    try:
        h, w = (int(s) for s in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: grid must be a pair (h, w) of ints, got {grid!r}") from None
    if h < 1 or w < 1 or h * w != tokens.shape[1]:
        raise ValueError(
            f"{where}: grid (h, w) = ({h}, {w}) holds {h * w} tokens but the input has N = {tokens.shape[1]} "
            f"tokens (shape {tuple(tokens.shape)})"
        )
    return h, w
