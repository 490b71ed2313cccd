"""DiT's hybrid loss against independent oracles: float64 Bayes posteriors, torch.distributions' KL,
scipy's normal CDF, and diffusers' DDPMScheduler (the sampler's own schedule and learned-range variance)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from dit_gspn.diffusion import DIT_SCHEDULE, GaussianDiffusion


B, C, H, W = 6, 3, 5, 4


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion()


def _oracle_tables():
    """alpha_t and alpha_bar_t in float64, computed step by step from the definition."""
    betas = [DIT_SCHEDULE["beta_start"] + i * (DIT_SCHEDULE["beta_end"] - DIT_SCHEDULE["beta_start"]) / 999
             for i in range(1000)]
    alpha_bar, running = [], 1.0
    for b in betas:
        running *= 1.0 - b
        alpha_bar.append(running)
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(alpha_bar, dtype=torch.float64)


def _oracle_posterior(x0, xt, t):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule on q(x_{t-1} | x_0) and q(x_t | x_{t-1}), float64."""
    betas, abar = _oracle_tables()
    beta = betas[t].view(-1, 1, 1, 1)
    abar_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t])).view(-1, 1, 1, 1)
    prior_var = 1.0 - abar_prev
    precision = 1.0 / prior_var + (1.0 - beta) / beta
    var = 1.0 / precision
    mean = var * (abar_prev.sqrt() * x0 / prior_var + (1.0 - beta).sqrt() * xt / beta)
    return mean, var


def test_schedule_matches_diffusers_sampler(diffusion):
    sched = DDPMScheduler(**DIT_SCHEDULE)
    torch.testing.assert_close(torch.from_numpy(diffusion.alphas_cumprod).float(), sched.alphas_cumprod,
                               rtol=1e-5, atol=1e-7)
    _, abar = _oracle_tables()
    np.testing.assert_allclose(diffusion.alphas_cumprod, abar.numpy(), rtol=1e-12)


def test_posterior_matches_bayes_rule(diffusion):
    x0 = torch.randn(B, C, H, W, dtype=torch.float64)
    xt = torch.randn(B, C, H, W, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 250, 700, 999])
    mean, log_var = diffusion.q_posterior_mean_variance(x0.float(), xt.float(), t)
    oracle_mean, oracle_var = _oracle_posterior(x0, xt, t)
    torch.testing.assert_close(mean.double(), oracle_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_var.double().expand_as(oracle_var), oracle_var.log(), rtol=1e-5, atol=1e-5)


def test_learned_variance_matches_diffusers_learned_range(diffusion):
    sched = DDPMScheduler(**DIT_SCHEDULE, variance_type="learned_range")
    xt = torch.randn(1, C, H, W)
    for step in (1, 37, 500, 999):
        v = torch.rand(1, C, H, W) * 2 - 1
        out = torch.cat([torch.randn(1, C, H, W), v], dim=1)
        _, log_var, _ = diffusion.p_mean_variance(out, xt, torch.tensor([step]))
        torch.testing.assert_close(log_var, sched._get_variance(step, predicted_variance=v), rtol=1e-4, atol=1e-4)


def _oracle_vb_bits(x0, xt, t, eps_model, v):
    """KL(q(x_{t-1} | x_t, x_0) || p) in bits per dimension, float64: the model's x_0 from epsilon, its
    posterior mean by Bayes, its variance on the log-interpolation between the posterior variance and beta_t."""
    betas, abar = _oracle_tables()
    ab = abar[t].view(-1, 1, 1, 1)
    pred_x0 = (xt - (1 - ab).sqrt() * eps_model) / ab.sqrt()
    model_mean, _ = _oracle_posterior(pred_x0, xt, t)
    true_mean, true_var = _oracle_posterior(x0, xt, t)
    frac = (v + 1) / 2
    model_log_var = frac * betas[t].view(-1, 1, 1, 1).log() + (1 - frac) * true_var.log()
    kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, (0.5 * model_log_var).exp()))
    return kl.mean(dim=(1, 2, 3)) / math.log(2)


T_ABOVE_ZERO = torch.tensor([1, 5, 100, 400, 800, 999])


def test_vb_is_kl_in_bits_for_t_above_zero(diffusion):
    x0 = torch.randn(B, C, H, W, dtype=torch.float64).clamp(-1, 1)
    eps_true = torch.randn_like(x0)
    _, abar = _oracle_tables()
    ab = abar[T_ABOVE_ZERO].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps_true
    eps_model = torch.randn_like(x0)
    v = torch.rand_like(x0) * 2 - 1
    vb = diffusion.vb_terms_bpd(torch.cat([eps_model, v], 1).float(), x0.float(), xt.float(), T_ABOVE_ZERO)
    oracle = _oracle_vb_bits(x0, xt, T_ABOVE_ZERO, eps_model, v)
    torch.testing.assert_close(vb.double(), oracle, rtol=2e-3, atol=1e-5)


def test_hybrid_loss_computes_in_float64_for_float64_inputs(diffusion):
    """float64 data gives a float64 loss equal to the float64 oracle (not a float32 loss cast back)."""
    x0 = torch.randn(B, C, H, W, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn_like(x0)
    out = torch.cat([torch.randn_like(x0), torch.rand_like(x0) * 2 - 1], dim=1)
    seen = {}

    def model(x, t):
        seen["x_t"] = x
        return out

    losses = diffusion.training_losses(model, x0, T_ABOVE_ZERO, noise=noise)
    assert all(value.dtype == torch.float64 for value in losses.values())
    _, abar = _oracle_tables()
    ab = abar[T_ABOVE_ZERO].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(seen["x_t"], xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses["mse"], ((noise - out[:, :C]) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["vb"], _oracle_vb_bits(x0, xt, T_ABOVE_ZERO, out[:, :C], out[:, C:]),
                               rtol=1e-10, atol=1e-12)
    single = diffusion.training_losses(lambda x, t: out.float(), x0.float(), T_ABOVE_ZERO, noise=noise.float())
    assert single["loss"].dtype == torch.float32  # float32 stays the default


def test_vb_is_discretised_decoder_nll_at_t_zero(diffusion):
    x0 = (torch.randint(0, 256, (B, C, H, W)).double() / 127.5 - 1)
    t = torch.zeros(B, dtype=torch.long)
    eps_true = torch.randn_like(x0)
    _, abar = _oracle_tables()
    xt = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps_true
    eps_model = eps_true + 0.1 * torch.randn_like(x0)
    v = torch.rand_like(x0) * 2 - 1
    vb = diffusion.vb_terms_bpd(torch.cat([eps_model, v], 1).float(), x0.float(), xt.float(), t)

    betas, _ = _oracle_tables()
    pred_x0 = (xt - (1 - abar[0]).sqrt() * eps_model) / abar[0].sqrt()
    mean = pred_x0  # at t = 0, q(x_{-1} | x_0, x_t) collapses onto x_0
    _, var1 = _oracle_posterior(x0, xt, torch.ones_like(t))
    frac = (v + 1) / 2
    std = (0.5 * (frac * betas[0].log() + (1 - frac) * var1.log())).exp()
    lo = np.where(x0 < -0.999, -np.inf, (x0 - 1 / 255 - mean) / std)
    hi = np.where(x0 > 0.999, np.inf, (x0 + 1 / 255 - mean) / std)
    nll_bits = -np.log(np.maximum(norm.cdf(hi) - norm.cdf(lo), 1e-12)).mean(axis=(1, 2, 3)) / math.log(2)
    # ADM's tanh CDF is accurate to ~3e-4, so the NLL agrees to a few parts in a thousand.
    np.testing.assert_allclose(vb.double().numpy(), nll_bits, rtol=1e-2)


def test_hybrid_loss_routes_gradients_as_dit(diffusion):
    """MSE trains epsilon only; the VLB (mean detached) trains the variance channels only."""
    x0 = torch.randn(B, C, H, W)
    out = torch.randn(B, 2 * C, H, W, requires_grad=True)
    t = torch.randint(0, 1000, (B,))
    losses = diffusion.training_losses(lambda x, t: out, x0, t)
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (B,)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :C].abs().max() == 0 and g_vb[:, C:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert g_mse[:, C:].abs().max() == 0 and g_mse[:, :C].abs().max() > 0


def test_min_snr_weights_the_mse_as_diffusers_training_scripts(diffusion):
    """snr_gamma: mse * min(SNR, gamma) / SNR with diffusers' compute_snr on DiT's schedule; the VLB is untouched."""
    from diffusers.training_utils import compute_snr

    x0, noise = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    out = torch.randn(B, 2 * C, H, W)
    t = torch.tensor([0, 3, 40, 250, 700, 999])
    plain = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)
    weighted = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise, snr_gamma=5.0)
    snr = compute_snr(DDPMScheduler(**DIT_SCHEDULE), t).double()
    expected = plain["mse"].double() * snr.clamp(max=5.0) / snr
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clamp are exercised
    # diffusers holds alpha_bar in float32: 1 - alpha_bar near t = 0 is good to ~1e-3 relative.
    torch.testing.assert_close(weighted["mse"].double(), expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], weighted["mse"] + weighted["vb"])


def test_training_loss_rejects_fixed_variance_output(diffusion):
    with pytest.raises(ValueError, match="6"):
        diffusion.training_losses(lambda x, t: x, torch.randn(2, 3, 4, 4), torch.tensor([3, 4]))
