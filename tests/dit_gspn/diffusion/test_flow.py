"""Flow matching (dit_gspn.diffusion.flow): SiT's linear interpolant and velocity loss in diffusers' convention,
the timestep draws (uniform, logit-normal, SD3's shift) and what the config sets."""
import numpy as np
import pytest
import torch


B, C, H, W = 6, 3, 5, 4


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
