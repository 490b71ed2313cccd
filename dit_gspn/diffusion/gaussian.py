"""DiT's training objective: epsilon prediction with a learned variance, loss = MSE + VLB.

The schedule is ``DIT_SCHEDULE`` (the one diffusers' samplers are built from), held here in
float64 as DiT holds it (``dit_betas``). The loss computes in the data's precision: float64 for
float64 data, float32 for anything lower (a bf16 model output included). The variance
parameterisation is diffusers' ``learned_range``: the model's second C channels v in [-1, 1]
interpolate log-variances between the clipped posterior variance and beta_t. The VLB term is the
KL between the true and the model posterior in bits, with the model's mean detached (so the VLB
trains only the variance, as in Nichol & Dhariwal), and the discretised Gaussian decoder NLL at
t = 0.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .schedule import DIT_SCHEDULE, dit_betas


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for every lower precision."""
    return torch.promote_types(x.dtype, torch.float32)


class GaussianDiffusion:
    """The forward process q, the learned-variance reverse process p, and DiT's hybrid training loss."""

    def __init__(self, num_train_timesteps: int = DIT_SCHEDULE["num_train_timesteps"],
                 beta_start: float = DIT_SCHEDULE["beta_start"], beta_end: float = DIT_SCHEDULE["beta_end"]):
        self.num_timesteps = int(num_train_timesteps)
        # Tables in float64 (as DiT/ADM); a lookup casts a row to the tensor's compute dtype.
        betas = dit_betas(self.num_timesteps, beta_start, beta_end)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0: use t = 1's value there so its log is finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)

    @staticmethod
    def _extract(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] in ``like``'s compute dtype (float64 or float32) on ``t``'s device, shaped to broadcast over it."""
        values = torch.from_numpy(table).to(device=t.device)[t].to(_compute_dtype(like))
        return values.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, num_timesteps)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, model_output, x_t, t):
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from a 2C-channel model output.

        The first C channels are epsilon; the last C are v in [-1, 1] (``learned_range``).
        """
        channels = x_t.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"the model must output 2 x {channels} channels (epsilon and variance), "
                             f"got shape {tuple(model_output.shape)}")
        eps, var_values = model_output.split(channels, dim=1)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                       - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Per-sample VLB term in bits per dimension: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=mean, log_scales=0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model: Callable, x_start, t, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None, snr_gamma: float | None = None) -> dict:
        """DiT's hybrid loss per sample: {"loss": mse + vb, "mse": ..., "vb": ...}, each of shape (B,).

        ``model(x_t, t, **model_kwargs)`` must return 2C channels. The VLB sees the epsilon half
        detached, so its gradient reaches only the variance channels. ``snr_gamma``: weight the
        epsilon MSE by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023, as diffusers'
        training scripts' ``--snr_gamma``); None keeps DiT's unweighted MSE.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, t, **(model_kwargs or {}))
        channels = x_start.shape[1]
        if model_output.shape[1] != 2 * channels or model_output.shape[2:] != x_start.shape[2:]:
            raise ValueError(f"model output shape {tuple(model_output.shape)} does not fit input "
                             f"{tuple(x_start.shape)}: expected (B, {2 * channels}, "
                             f"{', '.join(map(str, x_start.shape[2:]))})")
        dtype = _compute_dtype(x_start)
        model_output = model_output.to(dtype)
        eps, var_values = model_output.split(channels, dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start.to(dtype), x_t.to(dtype), t)
        mse = _mean_flat((noise.to(dtype) - eps) ** 2)
        if snr_gamma is not None:
            snr = self._extract(self.alphas_cumprod / (1.0 - self.alphas_cumprod), t, mse)
            mse = mse * torch.clamp(snr, max=float(snr_gamma)) / snr
        return {"loss": mse + vb, "mse": mse, "vb": vb}
