"""Flow matching: SiT's linear interpolant with velocity prediction, in diffusers' flow-matching convention.

A noise level s in [0, 1] mixes data and noise linearly, x_s = (1 - s) x_0 + s eps (s = 1 is pure
noise), and the model, given x_s and the timestep ``s * num_train_timesteps``, predicts the velocity
eps - x_0 under a plain MSE (no learned variance). That is the convention of diffusers'
``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` (Stable Diffusion 3's), which
sample these models; SiT writes the same path with time reversed (t = 1 - s) and t in [0, 1].
Noise levels are drawn uniformly, or logit-normally (SD3) through diffusers'
``compute_density_for_timestep_sampling``, and optionally moved towards noise by SD3's timestep shift
(``shift_noise_levels``), which the samplers apply to their grid as well.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

#: How training draws noise levels: uniform on [0, 1], or sigmoid of a normal (more weight on the middle).
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def check_shift(shift: float) -> float:
    """``shift`` as a float, or a ValueError unless it is a positive finite number."""
    shift = float(shift)
    if not (np.isfinite(shift) and shift > 0):
        raise ValueError(f"the timestep shift must be a positive number (1 = no shift), got {shift}")
    return shift


def shift_noise_levels(s, shift: float = 1.0):
    """SD3's timestep shift (Esser et al. 2024; LightningDiT): s' = shift s / (1 + (shift - 1) s).

    Keeps 0 and 1 in place; shift > 1 moves every level in between towards noise (more steps, and more
    training, at high noise), as higher resolutions need. ``shift == 1`` returns ``s`` itself, untouched.
    Works on floats, numpy arrays and tensors.
    """
    shift = check_shift(shift)
    if shift == 1.0:
        return s
    return shift * s / (1 + (shift - 1) * s)


#: Where Heun's grid ends before its last step to 0 (diffusers' default): that step is first order (diffusers
#: evaluates no corrector at s = 0), so it is kept this small. Measured on data N(0, 0.25) with the exact
#: velocity (docs/sampling.md): N equal steps instead make Heun 3.5-8.5x less accurate at N = 5..50.
HEUN_LAST_LEVEL = 1e-3


def ode_noise_levels(num_steps: int, shift: float = 1.0, last_level: float | None = None) -> np.ndarray:
    """The ``num_steps`` noise levels an ODE sampler evaluates, float64, from 1 evenly down to ``last_level``,
    then shifted; the sampler's last step goes from there to 0.

    The default ``last_level`` 1 / N makes all N steps equal (Euler's grid). diffusers' default grid,
    ``linspace(1, 0.001, N)``, ends with a step of 0.001, so N Euler steps there integrate like N - 1;
    Heun keeps it (``HEUN_LAST_LEVEL``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    last_level = 1.0 / num_steps if last_level is None else float(last_level)
    return shift_noise_levels(np.linspace(1.0, last_level, num_steps), shift)


class FlowMatching:
    """The linear interpolant, its velocity target and the training loss; the same interface as GaussianDiffusion."""

    def __init__(self, num_train_timesteps: int = 1000, timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.shift = check_shift(shift)

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) float32 noise levels s in [0, 1] (not yet scaled to the model's timestep range), drawn as
        ``timestep_sampling`` says and then shifted by ``shift`` (1: not at all)."""
        s = compute_density_for_timestep_sampling(self.timestep_sampling, batch, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, device="cpu", generator=generator)
        return shift_noise_levels(s.float(), self.shift).to(device)

    @staticmethod
    def interpolate(x_start: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) x_0 + s eps, with s of shape (B,)."""
        s = s.view(-1, *([1] * (x_start.ndim - 1))).to(x_start.dtype)
        return (1.0 - s) * x_start + s * noise

    def training_losses(self, model: Callable, x_start, s, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """{"loss": mse, "mse": mse}, each of shape (B,): the MSE between the model's output and eps - x_0.

        ``model(x_s, s * num_train_timesteps, **model_kwargs)`` must return C channels (a velocity).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_s = self.interpolate(x_start, s, noise)
        model_output = model(x_s, s * self.num_train_timesteps, **(model_kwargs or {}))
        if model_output.shape != x_start.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} does not fit input "
                             f"{tuple(x_start.shape)}: flow matching predicts a velocity with the input's shape "
                             f"(a model with learn_sigma=False)")
        target = noise.float() - x_start.float()
        mse = ((model_output.float() - target) ** 2).mean(dim=tuple(range(1, x_start.ndim)))
        return {"loss": mse, "mse": mse}
