"""ADM's samplers written out in float64 from its equations: the oracle for ``ddpm`` and ``ddim``.

From Ho et al. 2020 (the posterior q(x_{t-1} | x_t, x_0)), Nichol & Dhariwal 2021 (the learned-range
variance, respacing) and Song et al. 2021 (DDIM), in the conventions of openai/guided-diffusion's
``gaussian_diffusion.py`` and ``respace.py`` (the sampler DiT ships). Nothing here comes from dit_gspn or
diffusers: the schedule is a running product of Python floats, the respacing a numpy accumulation, and
every step the textbook formula.
"""
from __future__ import annotations

import math

import numpy as np
import torch

T = 1000


def alpha_bars() -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) for DiT's linear betas 1e-4 .. 0.02, float64."""
    running, out = 1.0, []
    for i in range(T):
        running *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / (T - 1))
        out.append(running)
    return np.array(out)


def space_timesteps(n: int) -> list[int]:
    """ADM's ``space_timesteps(1000, "n")``: partial sums of the stride (T - 1) / (n - 1), added one at a time
    in float64, each rounded to the nearest integer (halves to even)."""
    stride = 1.0 if n == 1 else (T - 1) / (n - 1)
    positions = np.add.accumulate(np.array([0.0] + [stride] * (n - 1)))
    return np.rint(positions).astype(int).tolist()


def ddim_stride(n: int) -> int | None:
    """The smallest integer stride s < T with ceil(T / s) = n steps, or None (ADM's ``"ddimN"``)."""
    return next((s for s in range(1, T) if -(-T // s) == n), None)


def ddim_timesteps(n: int) -> list[int]:
    stride = ddim_stride(n)
    return [stride * k for k in range(n)]


class Respaced:
    """ADM's diffusion over the kept timesteps only: alpha_bar at each kept step and at the one before it."""

    def __init__(self, kept):
        self.kept = list(kept)
        ab = alpha_bars()[self.kept]
        self.ab = ab
        self.ab_prev = np.concatenate([[1.0], ab[:-1]])
        self.beta = 1.0 - ab / self.ab_prev

    def x0(self, k, x, eps, clip):
        ab = self.ab[k]
        x0 = x / math.sqrt(ab) - math.sqrt(1.0 / ab - 1.0) * eps
        return x0.clamp(-1, 1) if clip else x0

    def p_sample(self, k, x, eps, v=None, clip=False):
        """(mean, variance, x0) of ADM's ``p_sample`` at kept step k: the posterior q(x_{k-1} | x_k, x0) with
        x0 from eps, and the variance of the sample it draws (0 at the last step, which adds no noise); with v
        (in [-1, 1]) the learned range between the posterior variance and beta, without it beta (fixed large)."""
        ab, ab_prev, beta = self.ab[k], self.ab_prev[k], self.beta[k]
        x0 = self.x0(k, x, eps, clip)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if k == 0:
            return mean, torch.zeros_like(x), x0
        if v is None:
            return mean, torch.full_like(x, beta), x0
        posterior = beta * (1 - ab_prev) / (1 - ab)
        frac = (v + 1) / 2
        return mean, torch.exp(frac * math.log(beta) + (1 - frac) * math.log(posterior)), x0

    def ddim_sample(self, k, x, eps, clip=False):
        """(next sample, x0) of ADM's ``ddim_sample`` with eta = 0: eps re-derived from the (clipped) x0, then
        x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) eps, with alpha_bar_prev = 1 after the last
        kept step."""
        ab, ab_prev = self.ab[k], self.ab_prev[k]
        x0 = self.x0(k, x, eps, clip)
        eps = (x / math.sqrt(ab) - x0) / math.sqrt(1.0 / ab - 1.0)
        return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps, x0


def ddpm_loop(model_fn, x, num_steps, draw_noise, learned=True, clip=False):
    """ADM's ``p_sample_loop`` over ``space_timesteps(1000, "num_steps")`` from x; ``model_fn(x, t)`` returns
    (eps, v) at original timestep t, ``draw_noise()`` the noise of each step that adds some."""
    process = Respaced(space_timesteps(num_steps))
    for k in reversed(range(num_steps)):
        eps, v = model_fn(x, process.kept[k])
        mean, var, _ = process.p_sample(k, x, eps, v if learned else None, clip)
        x = mean + var.sqrt() * draw_noise() if k > 0 else mean
    return x


def ddim_loop(model_fn, x, num_steps, clip=False):
    """ADM's ``ddim_sample_loop`` (eta = 0) over ``"ddim{num_steps}"`` from x."""
    process = Respaced(ddim_timesteps(num_steps))
    for k in reversed(range(num_steps)):
        eps, _ = model_fn(x, process.kept[k])
        x, _ = process.ddim_sample(k, x, eps, clip)
    return x
