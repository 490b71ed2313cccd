"""The exponential moving average of the weights that DiT samples from."""
from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` in eval mode (DiT starts its EMA as an exact copy)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay for the update after optimizer step ``step`` (1-based): ``decay``, or with ``warmup`` the
    ramp min(decay, (1 + step) / (10 + step)) that diffusers' EMAModel uses, so a short run's EMA is not
    dominated by its random initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter (as DiT); buffers are copied."""
    ema_params = [p for _, p in sorted(ema.named_parameters())]
    params = [p.detach() for _, p in sorted(model.named_parameters())]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1.0 - decay)
    for (_, e), (_, b) in zip(sorted(ema.named_buffers()), sorted(model.named_buffers())):
        e.copy_(b)
