"""One sampling loop for every diffusers scheduler: DiT's learned-variance DDPM, DDIM, DPM-Solver++, with CFG.

The model is any DiT-family module with ``forward(x, t, y)``, ``forward_with_cfg(x, t, y, cfg_scale,
guided_channels)``, ``num_classes`` (also the null class id), ``in_channels``, ``input_size`` and
``out_channels``: ``2 * in_channels`` (epsilon, then the variance interpolation) when it learns sigma, or
``in_channels`` (epsilon) when it does not; DDPM then uses the fixed large variance (beta), as DiT's
``create_diffusion(learn_sigma=False)``. ``ddpm`` and ``ddim`` equal ADM's samplers step for step
(``dit_gspn.diffusion.make_schedule``). A flow-matching model (``dit_gspn.diffusion.FlowMatching``) outputs
``in_channels`` (a velocity) and is drawn with the ``euler`` or ``heun`` ODE sampler or SiT's ``sde``, which
pass it fractional timesteps. What a sampler needs to know of the model (its output channels, its timesteps,
the schedule) it asks the sampler's objective (``dit_gspn.diffusion.objective``).

Classifier-free guidance can be limited to an interval of noise levels (Kynkaanniemi et al. 2024): a step
whose noise level (the model's timestep / 1000: s for flow matching, t / 1000 for DiT's diffusion) lies
outside it evaluates the conditional model alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from dit_gspn.diffusion import DIT_SCHEDULE, objective_of_sampler
from dit_gspn.sizes import size_pair

Generators = torch.Generator | Sequence[torch.Generator] | None


def model_size(model) -> tuple[int, int]:
    """The (H, W) of the latent / pixel map the model was trained on (``model.input_size``: int or pair)."""
    return size_pair(model.input_size, "model.input_size")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_labels(labels, num_classes: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("labels is empty: pass at least one class id")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class ids must be in [0, {num_classes}) for this model; got {bad.unique().tolist()}")
    return labels


def check_cfg_scale(scale: float) -> float:
    """``scale`` as a float if it is a classifier-free guidance scale DiT accepts (>= 1; 1 = no guidance, the
    conditional model alone); else a ValueError (NaN included)."""
    scale = float(scale)
    if not scale >= 1.0:
        raise ValueError(f"the guidance scale must be >= 1 (1 = no guidance), got {scale}")
    return scale


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """``interval`` as (low, high) with 0 <= low <= high <= 1, or None (guide every step); else a ValueError."""
    if interval is None:
        return None
    low, high = (float(v) for v in interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the guidance interval must be two noise levels 0 <= low <= high <= 1, got {low}, {high}")
    return low, high


def guided_at(noise_level: float, interval: tuple[float, float] | None) -> bool:
    """Whether a guided sampler guides a step at ``noise_level``: inside [low, high], ends included."""
    return interval is None or interval[0] <= noise_level <= interval[1]


@torch.no_grad()
def sample(model, labels, *, sampler: str = "ddpm", num_steps: int | None = None, cfg_scale: float = 1.0,
           guided_channels: int | None = None, guidance_interval: tuple[float, float] | None = None,
           flow_shift: float = 1.0, size: tuple[int, int] | None = None,
           generator: Generators = None, progress: bool = False, clip_denoised: bool = False,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw one sample per class id in ``labels``; returns (N, C, H, W) in the model's output space.

    ``sampler`` is one of ``ddpm`` (DiT's default: learned variance, the model's full 2C output), ``ddim``
    or ``dpm-solver++`` (the epsilon half), over ``num_steps`` respaced steps of DiT's schedule; or, for a
    flow-matching model, ``euler`` or ``heun`` (the velocity ODE, ``num_steps`` equal steps) or ``sde``
    (SiT's Euler-Maruyama), over a grid shifted by ``flow_shift`` (SD3's timestep shift; 1 = none).
    ``num_steps=None`` takes the sampler's default (its ``SamplerSpec``); any registered sampler is accepted
    (``dit_gspn.diffusion.SAMPLERS``). Which objective a checkpoint was trained with is in its
    ``SamplingInfo.objective`` (``dit_gspn.diffusion.check_sampling`` matches the two).
    ``cfg_scale`` > 1 uses classifier-free guidance through ``model.forward_with_cfg`` (conditional half,
    then the unconditional half with the null class ``model.num_classes``); ``guided_channels=None``
    guides all epsilon channels, ``3`` reproduces DiT's published behaviour. ``guidance_interval`` =
    (low, high) guides only the steps whose noise level (model timestep / 1000) is in [low, high] and
    evaluates the conditional model alone at the others; None guides every step. ``size`` = (H, W) of the map,
    default ``model.input_size``. ``generator`` is one ``torch.Generator`` for the whole batch, or a list
    with one per sample: then sample i depends only on its own generator (not on the batch it is in),
    which is how batch sampling makes results independent of the number of processes.
    ``clip_denoised`` clips every step's predicted x0 to [-1, 1] (ADM's pixel-space sampling; see
    ``SamplingInfo.clip_denoised``); the flow samplers ignore it. ``dtype`` is the precision of the sampler's
    state and arithmetic (float32, or float64 with a float64 model); the initial noise is drawn in float32 for
    either, so both start from the same point (DDPM's and the SDE's per-step noise is drawn in ``dtype``).
    """
    objective = objective_of_sampler(sampler)  # the objective whose models it draws (ValueError if unknown)
    cfg_scale = check_cfg_scale(cfg_scale)
    guidance_interval = check_guidance_interval(guidance_interval)
    device = _model_device(model)
    labels = _as_labels(labels, model.num_classes, device)
    n = labels.numel()
    if isinstance(generator, tuple):
        generator = list(generator)
    if isinstance(generator, list) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} labels: pass one per sample, or a single one")
    height, width = size if size is not None else model_size(model)
    channels = model.in_channels
    guided = cfg_scale > 1.0

    x = randn_tensor((n, channels, height, width), generator=generator, device=device, dtype=torch.float32).to(dtype)
    y_guided = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    out_channels = getattr(model, "out_channels", 2 * channels)
    if out_channels not in (channels, 2 * channels):
        raise ValueError(f"model.out_channels is {out_channels}; expected {channels} (epsilon) or "
                         f"{2 * channels} (epsilon and learned variance) for in_channels={channels}")
    if not objective.learn_sigma and out_channels != channels:
        raise ValueError(f"sampler {sampler!r} needs a {objective.kind} model, which outputs {channels} channels (a "
                         f"{objective.prediction}); this model outputs {out_channels} (epsilon and a learned "
                         f"variance: DDPM's)")
    schedule = objective.schedule(sampler, num_steps, clip_denoised=clip_denoised,
                                  learn_sigma=out_channels == 2 * channels, flow_shift=flow_shift)
    for t, model_t in tqdm(list(schedule.steps()), desc="sampling", disable=not progress, leave=False):
        guide = guided and guided_at(float(model_t) / DIT_SCHEDULE["num_train_timesteps"], guidance_interval)
        rows = 2 * n if guide else n
        t_batch = objective.model_timesteps(model_t, rows, device)
        if guide:
            out = model.forward_with_cfg(torch.cat([x, x]), t_batch, y_guided, cfg_scale,
                                         guided_channels=guided_channels)[:n]
        else:
            out = model(x, t_batch, labels)
        if out.shape[1] != out_channels:
            raise ValueError(f"the model returned {out.shape[1]} channels; expected out_channels={out_channels}")
        out = out.to(dtype)
        if not schedule.takes_variance:
            out = out[:, :channels]
        if schedule.stochastic:
            x = schedule.step(out, t, x, generator=generator).prev_sample
        else:
            x = schedule.step(out, t, x).prev_sample  # ODE steps and DDIM (eta = 0) draw no noise
    return x
