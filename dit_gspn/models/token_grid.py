"""The (h, w) token grid that travels with a (B, N, C) token sequence: its checks, and the tokens seen as a map."""
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


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, C) tokens -> the (B, C, h, w) channels-last view of them (no copy)."""
    return tokens.view(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) map -> (B, N, C) tokens (a view when the map is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def channel_first(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, K) tokens -> a contiguous channel-first (B, K, h, w) map."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
