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


# --------------------------------------------------------------------------------------------------------------
# Flow matching: the interpolant and its sampler share diffusers' FlowMatchEulerDiscreteScheduler convention.

def point_mass_velocity(target: torch.Tensor):
    """The exact flow-matching velocity for data that is always ``target``: x_s = (1 - s) target + s eps, so
    eps - target = (x_s - target) / s. Called with the model's timestep s * 1000."""
    def velocity(x, t, **_):
        s = (t.double() / 1000).view(-1, *([1] * (x.ndim - 1)))
        return ((x.double() - target) / s).to(x.dtype)
    return velocity


def test_flow_interpolant_and_loss_match_diffusers_convention():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit_gspn.diffusion import FlowMatching

    flow = FlowMatching()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(50)
    x0, noise = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    idx = torch.tensor([0, 3, 17, 25, 40, 49])
    s = sched.sigmas[idx].double()
    seen = {}

    def model(x, t, y):
        seen["x"], seen["t"] = x, t
        return torch.sin(3 * x) * (t / 1000).view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)

    y = torch.arange(B, dtype=torch.float64)
    losses = flow.training_losses(model, x0, s, dict(y=y), noise)
    # diffusers' forward process for the sampler's own timesteps: sigma * noise + (1 - sigma) * sample.
    expected_x = torch.cat([sched.scale_noise(x0[i:i + 1], sched.timesteps[idx[i]:idx[i] + 1], noise[i:i + 1])
                            for i in range(B)])
    torch.testing.assert_close(seen["x"], expected_x.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["t"], sched.timesteps[idx].double(), rtol=1e-6, atol=1e-4)
    oracle = ((model(expected_x, sched.timesteps[idx].double(), y) - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"].double(), oracle, rtol=1e-5, atol=1e-6)
    # The exact velocity of a point mass has zero loss at every level: training and sampling agree on s.
    exact = flow.training_losses(point_mass_velocity(x0), x0, torch.rand(B, dtype=torch.float64) * 0.98 + 0.01,
                                 noise=noise)
    assert exact["loss"].max() < 1e-10  # float32 rounding; a wrong convention gives O(1)


def test_flow_timestep_sampling_uniform_and_logit_normal():
    from scipy.stats import kstest, logistic, norm as normal

    from dit_gspn.diffusion import FlowMatching

    g = torch.Generator().manual_seed(0)
    uniform = FlowMatching().sample_timesteps(4000, "cpu", g)
    logit = FlowMatching(timestep_sampling="logit_normal").sample_timesteps(4000, "cpu", g)
    assert uniform.dtype == torch.float32 and kstest(uniform.numpy(), "uniform").pvalue > 1e-3
    # sigmoid(N(0, 1)): its logit is standard normal.
    assert kstest(logistic.ppf(logit.double().numpy()), normal.cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatching(timestep_sampling="cosine")


def test_flow_loss_rejects_a_learned_variance_output():
    from dit_gspn.diffusion import FlowMatching

    with pytest.raises(ValueError, match="learn_sigma=False"):
        FlowMatching().training_losses(lambda x, t: torch.cat([x, x], 1), torch.randn(2, 3, 4, 4),
                                       torch.tensor([0.3, 0.5]))


@pytest.mark.parametrize("shift", [3.0, 0.5])
def test_flow_timestep_shift_draws_sd3s_shifted_levels(shift):
    """Training's levels with SD3's shift s' = k s / (1 + (k - 1) s): the same draws as without it, mapped by the
    formula (float64 here), and distributed by its CDF P(s' <= x) = x / (k - (k - 1) x) for uniform s."""
    from scipy.stats import kstest

    from dit_gspn.diffusion import FlowMatching, shift_noise_levels

    plain = FlowMatching().sample_timesteps(4000, "cpu", torch.Generator().manual_seed(3)).double()
    shifted = FlowMatching(shift=shift).sample_timesteps(4000, "cpu", torch.Generator().manual_seed(3))
    assert shifted.dtype == torch.float32
    torch.testing.assert_close(shifted.double(), shift * plain / (1 + (shift - 1) * plain), rtol=1e-6, atol=1e-7)
    assert kstest(shifted.double().numpy(), lambda x: x / (shift - (shift - 1) * x)).pvalue > 1e-3
    assert (shifted.mean() > plain.mean()) == (shift > 1)  # a shift above 1 trains more at high noise
    s = np.random.default_rng(0).random(50)
    np.testing.assert_allclose(shift_noise_levels(s, shift), shift * s / (1 + (shift - 1) * s), rtol=1e-15)
    assert shift_noise_levels(np.array([0.0, 1.0]), shift).tolist() == [0.0, 1.0]


def test_flow_timestep_shift_is_off_by_default_and_set_from_the_config():
    from dit_gspn.diffusion import FlowMatching
    from dit_gspn.training.config import ConfigError, parse_config

    g = torch.Generator().manual_seed(1)
    default = FlowMatching().sample_timesteps(64, "cpu", g)
    assert torch.equal(FlowMatching(shift=1.0).sample_timesteps(64, "cpu", torch.Generator().manual_seed(1)),
                       default)
    config = parse_config({"train": {"objective": "flow", "objective_kwargs": {"shift": 3.0}}})
    assert config.train.objective_kwargs["shift"] == 3.0 and config.objective.shift == 3.0
    assert parse_config({"train": {"objective": "flow"}}).to_dict()["train"]["objective_kwargs"]["shift"] == 1.0
    with pytest.raises(ConfigError, match="unknown key 'train.objective_kwargs.shift'; the ddpm objective takes"):
        parse_config({"train": {"objective_kwargs": {"shift": 3.0}}})  # DiT's objective has no shift
    with pytest.raises(ConfigError, match="train.objective_kwargs: the timestep shift must be a positive number"):
        parse_config({"train": {"objective": "flow", "objective_kwargs": {"shift": 0}}})
    with pytest.raises(ConfigError, match="logging.flow_shift"):
        parse_config({"train": {"objective": "flow"}, "logging": {"flow_shift": -1}})
    with pytest.raises(ConfigError, match="logging.guidance_interval: the guidance interval must be"):
        parse_config({"logging": {"guidance_interval": [0.9, 0.1]}})
    with pytest.raises(ValueError, match="timestep shift must be a positive number"):
        FlowMatching(shift=0.0)
