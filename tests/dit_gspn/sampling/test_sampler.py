"""dit_gspn.sampling.sampler, the one sampling loop: DDPM and DDIM against ADM's formulas, DPM-Solver++ against
diffusers' loop, CFG, the flow samplers' grids and SiT's SDE against their equations, and the guidance interval."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from dit_gspn.sampling import sample

from helpers import adm_sampling as adm
from helpers.tiny_models import tiny_dit


pytestmark = pytest.mark.usefixtures("one_torch_thread", "reference_scan")


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _oracle_model(model, labels, cfg_scale=1.0, guided_channels=None):
    """The model in float64 as ADM's loops call it: (eps, v or None) at an original timestep."""
    model64 = copy.deepcopy(model).double()
    labels = torch.as_tensor(labels)
    ch = model.in_channels

    def model_fn(x, t):
        ts = torch.full((len(labels),), int(t))
        if cfg_scale > 1:
            null = torch.full_like(labels, model.num_classes)
            out = model64.forward_with_cfg(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([labels, null]),
                                           cfg_scale, guided_channels=guided_channels)[:len(labels)]
        else:
            out = model64(x, ts, labels)
        return out[:, :ch], (out[:, ch:] if out.shape[1] == 2 * ch else None)
    return model_fn


def _noise(generators, shape, dtype=torch.float32):
    """Per-sample standard normal draws, one generator per sample (as the sampler draws them), in float64."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generators]).double()


def _adm_ddpm(model, labels, num_steps, seed=0, clip=False, cfg_scale=1.0, guided_channels=None, shape=None):
    generators = _generators(len(labels), seed)
    shape = shape or (len(labels), model.in_channels, 8, 8)
    learned = model.out_channels == 2 * model.in_channels
    return adm.ddpm_loop(_oracle_model(model, labels, cfg_scale, guided_channels), _noise(generators, shape),
                         num_steps, lambda: _noise(generators, shape), learned=learned, clip=clip)


def _adm_ddim(model, labels, num_steps, seed=0, clip=False):
    shape = (len(labels), model.in_channels, 8, 8)
    return adm.ddim_loop(_oracle_model(model, labels), _noise(_generators(len(labels), seed), shape), num_steps,
                         clip=clip)


def _deviation(ours, oracle):
    """max |ours - oracle| / max(1, |oracle|): the untrained model's unclipped samples reach a few hundred."""
    return float(((ours.double() - oracle).abs() / oracle.abs().clamp(min=1)).max())


@pytest.mark.parametrize("clip", [False, True], ids=["raw", "clip"])
def test_ddpm_250_steps_equals_adm_end_to_end(clip):
    """DiT's default (250 respaced steps, learned variance) from the same noise; clipping as in pixel space."""
    model = tiny_dit(mixer="attention")
    labels = [0, 3, 4]
    ours = sample(model, labels, num_steps=250, generator=_generators(3), clip_denoised=clip)
    oracle = _adm_ddpm(model, labels, 250, clip=clip)
    assert _deviation(ours, oracle) < 1e-4
    if clip:  # the untrained model's x0 leaves [-1, 1], so clipping must have changed the result
        assert _deviation(ours, _adm_ddpm(model, labels, 250)) > 1e-3


@pytest.mark.parametrize("steps, cfg_scale, guided_channels", [(21, 1.0, None), (7, 3.0, None), (7, 3.0, 3)])
def test_ddpm_respaced_and_guided_equals_adm(steps, cfg_scale, guided_channels):
    """A count where ADM's respacing is not linspace's (21), and guidance on all or DiT's 3 of 4 channels."""
    model = tiny_dit(in_channels=4)
    labels = [1, 2]
    ours = sample(model, labels, num_steps=steps, cfg_scale=cfg_scale, guided_channels=guided_channels,
                  generator=_generators(2))
    oracle = _adm_ddpm(model, labels, steps, cfg_scale=cfg_scale, guided_channels=guided_channels)
    assert _deviation(ours, oracle) < 1e-4


def test_ddpm_without_learned_sigma_uses_dits_fixed_large_variance():
    model = tiny_dit(learn_sigma=False)
    ours = sample(model, [0, 1], num_steps=10, generator=_generators(2))
    assert _deviation(ours, _adm_ddpm(model, [0, 1], 10)) < 1e-4


@pytest.mark.parametrize("steps, clip", [(10, False), (10, True), (3, False)])
def test_ddim_equals_adm_ddim_end_to_end(steps, clip):
    """ADM's ddimN: stride 100 for 10 steps, 334 for 3 (not 1000 // 3), the last step returning x0."""
    model = tiny_dit()
    labels = [1, 2]
    ours = sample(model, labels, sampler="ddim", num_steps=steps, generator=_generators(2), clip_denoised=clip)
    assert _deviation(ours, _adm_ddim(model, labels, steps, clip=clip)) < 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_float64_sampling_equals_adm_to_float64_precision(sampler):
    model = tiny_dit(mixer="attention").double()
    labels = [0, 4]
    ours = sample(model, labels, sampler=sampler, num_steps=10, generator=_generators(2), dtype=torch.float64)
    assert ours.dtype == torch.float64
    if sampler == "ddim":
        oracle = _adm_ddim(model, labels, 10)
    else:  # the sampler draws its per-step noise in float64
        generators = _generators(2)
        shape = (2, 3, 8, 8)
        oracle = adm.ddpm_loop(_oracle_model(model, labels), _noise(generators, shape), 10,
                               lambda: _noise(generators, shape, torch.float64))
    assert _deviation(ours, oracle) < 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 250), ("ddim", 10)])
def test_samplers_on_the_gpu_equal_adm(sampler, steps, dtype, monkeypatch):
    """The same samplers on CUDA (float64 tables on the CPU, state on the GPU) against the CPU float64 oracle."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_dit(mixer="attention").to(dtype)
    labels = [0, 4]
    ours = sample(model.cuda(), labels, sampler=sampler, num_steps=steps, generator=_generators(2), dtype=dtype)
    assert ours.is_cuda and ours.dtype == dtype
    model = model.cpu()
    if sampler == "ddim":
        oracle = _adm_ddim(model, labels, steps)
    else:
        generators, shape = _generators(2), (2, 3, 8, 8)
        oracle = adm.ddpm_loop(_oracle_model(model, labels), _noise(generators, shape), steps,
                               lambda: _noise(generators, shape, dtype))
    assert _deviation(ours.cpu(), oracle) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_dpm_solver_matches_diffusers_loop():
    model = tiny_dit()
    labels = torch.tensor([1, 2])
    ours = sample(model, labels, sampler="dpm-solver++", num_steps=7, generator=_generators(2))
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", timestep_spacing="linspace",
                                        algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(7)
    x = randn_tensor((2, 3, 8, 8), generator=_generators(2))
    for t in sched.timesteps:
        eps = model(x, torch.full((2,), int(t)), labels)[:, :3]
        x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x)


def test_cfg_scale_one_equals_conditional_model():
    model = tiny_dit()
    plain = sample(model, [0, 1, 2], num_steps=5, cfg_scale=1.0, generator=_generators(3))
    with torch.no_grad():
        guided = sample(model, [0, 1, 2], num_steps=5, cfg_scale=1.0 + 1e-7, generator=_generators(3))
    torch.testing.assert_close(plain, guided, rtol=1e-4, atol=1e-4)
    strong = sample(model, [0, 1, 2], num_steps=5, cfg_scale=4.0, generator=_generators(3))
    assert (strong - plain).abs().max() > 1e-2  # guidance does change the result


def test_per_sample_generators_make_samples_independent_of_the_batch():
    model = tiny_dit()
    gens = _generators(4, seed=10)
    together = sample(model, [0, 1, 2, 3], num_steps=4, generator=gens)
    alone = sample(model, [2], num_steps=4, generator=_generators(4, seed=10)[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)


def test_non_square_size_and_model_without_learned_sigma():
    model = tiny_dit(learn_sigma=False)
    out = sample(model, [0, 1], num_steps=3, size=(6, 10), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 6, 10) and torch.isfinite(out).all()


class PointMassFlow(nn.Module):
    """A flow-matching "model" whose data is one fixed image per class: its exact velocity (x_s - target_y) / s,
    read from the timestep s * 1000 the sampler passes. Every ODE sampler must land on target_y."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.register_buffer("targets", targets)
        self.num_classes, self.in_channels = targets.shape[0], targets.shape[1]
        self.out_channels, self.input_size = self.in_channels, tuple(targets.shape[-2:])
        self.timesteps = []

    def forward(self, x, t, y):
        assert t.dtype == torch.float32
        self.timesteps.append(float(t[0]))
        s = (t.double() / 1000).view(-1, 1, 1, 1)
        return ((x.double() - self.targets[y].double()) / s).float()


@pytest.mark.parametrize("sampler, steps", [("euler", 7), ("heun", 6)])
def test_flow_samplers_integrate_the_velocity_in_the_training_convention(sampler, steps):
    targets = torch.rand(3, 3, 4, 6) * 2 - 1
    model = PointMassFlow(targets)
    out = sample(model, [2, 0, 2], sampler=sampler, num_steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, targets[[2, 0, 2]], rtol=1e-4, atol=1e-4)
    # From pure noise (s = 1, timestep 1000) down through fractional timesteps, one (Euler) or two (Heun)
    # model evaluations per step but the last.
    assert model.timesteps[0] == 1000.0 and len(model.timesteps) == (steps if sampler == "euler" else 2 * steps - 1)
    assert any(t != round(t) for t in model.timesteps)


def test_sample_errors_name_the_problem():
    model = tiny_dit()
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, [0], sampler="lms")
    with pytest.raises(ValueError, match="needs a flow-matching model.*outputs 6"):
        sample(model, [0], sampler="euler")
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        sample(model, [5], num_steps=2)
    with pytest.raises(ValueError, match="2 generators for 3 labels"):
        sample(model, [0, 1, 2], num_steps=2, generator=_generators(2))


def test_guided_channels_three_is_dit_published_behaviour():
    model = tiny_dit(in_channels=4)
    kwargs = dict(num_steps=3, cfg_scale=3.0)
    all_channels = sample(model, [0, 1], generator=_generators(2), **kwargs)
    four = sample(model, [0, 1], generator=_generators(2), guided_channels=4, **kwargs)
    three = sample(model, [0, 1], generator=_generators(2), guided_channels=3, **kwargs)
    torch.testing.assert_close(all_channels, four)
    assert (three - all_channels).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Flow samplers' grid and default steps, SiT's SDE, the guidance interval, the timestep shift
# ----------------------------------------------------------------------------------------------------------

def _flow_oracle_model(model, labels):
    """The flow model in float64, as u(x, s): the velocity eps - x_0 at noise level s (timestep 1000 s)."""
    model64 = copy.deepcopy(model).double()
    labels = torch.as_tensor(labels)

    @torch.no_grad()
    def velocity(x, s):
        return model64(x, torch.full((len(labels),), 1000.0 * s, dtype=torch.float64), labels)
    return velocity


def _sd3_shift(s, shift):
    """SD3's shift written out: s' = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def _ode_oracle(u, x, num_steps, heun, shift=1.0):
    """Euler / Heun (Euler on the step that reaches 0) in float64, shifted: Euler over N equal steps from s = 1
    to 0; Heun over N - 1 equal steps from 1 to 0.001, then one to 0 (diffusers' grid)."""
    grid = np.append(np.linspace(1.0, 0.001, num_steps), 0.0) if heun else np.linspace(1.0, 0.0, num_steps + 1)
    levels = _sd3_shift(grid, shift)
    for s, s_next in zip(levels[:-1], levels[1:]):
        h = s_next - s
        d = u(x, s)
        x_pred = x + h * d
        x = x + h / 2 * (d + u(x_pred, s_next)) if heun and s_next > 0 else x_pred
    return x


@pytest.mark.parametrize("sampler, steps, shift", [("euler", 5, 1.0), ("heun", 4, 1.0), ("euler", 6, 3.0),
                                                   ("heun", 3, 2.5)])
def test_flow_ode_samplers_take_n_equal_steps_and_the_shifted_grid(sampler, steps, shift):
    """Euler: N steps of size 1/N from s = 1 to 0 (no step of 0.001 at the end); Heun: diffusers' grid, whose
    first-order last step stays 0.001; both SD3-shifted when asked (once: diffusers' Heun shifts its end twice)."""
    model = tiny_dit(learn_sigma=False)
    labels = [0, 4]
    gens = _generators(2)
    ours = sample(model, labels, sampler=sampler, num_steps=steps, flow_shift=shift, generator=gens)
    oracle = _ode_oracle(_flow_oracle_model(model, labels), _noise(_generators(2), ours.shape), steps,
                         heun=sampler == "heun", shift=shift)
    assert _deviation(ours, oracle) < 5e-5  # float32 steps and timesteps: up to 9.4e-6 seen; a wrong grid > 1e-3
    if shift != 1.0:  # the shift does move the grid
        assert _deviation(ours, _ode_oracle(_flow_oracle_model(model, labels), _noise(_generators(2), ours.shape),
                                            steps, heun=sampler == "heun")) > 1e-3


def test_flow_euler_error_is_that_of_n_uniform_steps():
    """For u = c s (x_0 = x_1 - c / 2 exactly), N uniform Euler steps give x_1 - c (N + 1) / (2 N)."""
    c = torch.linspace(-2.0, 3.0, 3 * 4 * 4).view(1, 3, 4, 4)

    class Linear(PointMassFlow):
        def forward(self, x, t, y):
            self.timesteps.append(float(t[0]))
            return (c * (t / 1000).view(-1, 1, 1, 1)).expand_as(x).contiguous()

    for n in (1, 2, 5):
        model = Linear(torch.zeros(1, 3, 4, 4))
        out = sample(model, [0], sampler="euler", num_steps=n, generator=_generators(1))
        start = _noise(_generators(1), out.shape)
        torch.testing.assert_close(out.double(), start - c.double() * (n + 1) / (2 * n), rtol=1e-6, atol=1e-6)


def _sit_sde_oracle(velocity, x, num_steps, draw_noise, last_step_size=0.04):
    """SiT's ``Sampler.sample_sde`` with its sample.py defaults, in SiT's own time t (0 = noise, 1 = data), float64.

    Linear path x_t = t x_data + (1 - t) noise: alpha_t = t, sigma_t = 1 - t. score(x, t) = (alpha_t / alpha_t' v
    - x) / (sigma_t^2 - alpha_t / alpha_t' sigma_t' sigma_t) = (t v - x) / (1 - t); diffusion w(t) = sigma_t
    ("sigma" form, norm 1); SDE drift v + w score. Euler-Maruyama on linspace(0, 1 - last, N) (N - 1 steps,
    x + drift dt + sqrt(2 w) sqrt(dt) z), then the "Mean" last step x + drift(x, 1 - last) last.
    """
    t_grid = np.linspace(0.0, 1.0 - last_step_size, num_steps)
    dt = t_grid[1] - t_grid[0]

    def drift_and_w(x, t):
        v = velocity(x, t)
        score = (t * v - x) / (1.0 - t)
        w = 1.0 - t
        return v + w * score, w

    for t in t_grid[:-1]:
        drift, w = drift_and_w(x, t)
        x = x + drift * dt + math.sqrt(2.0 * w) * math.sqrt(dt) * draw_noise()
    drift, _ = drift_and_w(x, t_grid[-1])
    return x + drift * last_step_size


@pytest.mark.parametrize("steps", [2, 6])
def test_sde_sampler_equals_sits_euler_maruyama(steps):
    """Our convention -> SiT's: t = 1 - s, SiT's velocity is x_data - noise = -(our output eps - x_0), and the
    model sees 1000 s = 1000 (1 - t). Same initial and per-step noise (one generator per sample, in order)."""
    model = tiny_dit(learn_sigma=False)
    labels = [1, 3, 0]
    counting = []
    ours = sample(model, labels, sampler="sde", num_steps=steps, generator=_generators(3))
    u = _flow_oracle_model(model, labels)

    def sit_velocity(x, t):
        counting.append(t)
        return -u(x, 1.0 - t)

    gens = _generators(3)
    start = _noise(gens, ours.shape)
    oracle = _sit_sde_oracle(sit_velocity, start, steps, lambda: _noise(gens, ours.shape))
    assert len(counting) == steps
    assert _deviation(ours, oracle) < 1e-5
    other = sample(model, labels, sampler="sde", num_steps=steps, generator=_generators(3, seed=7))
    assert (other - ours).abs().max() > 1e-2  # the per-step noise does enter


def test_sde_sampler_lands_near_the_data_of_a_point_mass():
    """With the exact velocity of one image per class, SiT's SDE ends within its last step's reach of it: at
    s = 0.04, x = (1 - s) x_0 + s e, and SiT's noise-free "Mean" step leaves x_0 - s e (std 0.04, not 0)."""
    targets = torch.rand(2, 3, 4, 4) * 2 - 1
    model = PointMassFlow(targets)
    out = sample(model, [1, 0] * 8, sampler="sde", num_steps=100, generator=_generators(16))
    error = out - targets[[1, 0] * 8]
    assert abs(float(error.mean())) < 0.01 and 0.03 < float(error.std()) < 0.05
    assert len(model.timesteps) == 100 and model.timesteps[0] == 1000.0


def test_default_steps_are_the_samplers():
    """250 for DiT's samplers and SiT's SDE, 50 for the flow ODE samplers (SiT's sample_ode default)."""
    from dit_gspn.diffusion import SAMPLERS, make_schedule
    from dit_gspn.training.config import DEFAULTS, parse_config

    counts = {name: len(make_schedule(name).model_timesteps) for name in SAMPLERS}
    assert counts == {"ddpm": 250, "ddim": 250, "dpm-solver++": 250, "euler": 50, "heun": 99, "sde": 250}
    model = PointMassFlow(torch.zeros(1, 3, 2, 2))
    sample(model, [0], sampler="euler")
    assert len(model.timesteps) == 50
    flow = parse_config({"train": {"objective": "flow"}}).logging
    assert flow.sampler == "euler" and flow.sample_steps == 50
    assert parse_config(DEFAULTS).logging.sample_steps == 250


class GuidanceRecorder(nn.Module):
    """Wraps a model and records, per call, (noise level = timestep / 1000, whether it was the guided call)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        for name in ("num_classes", "in_channels", "out_channels", "input_size"):
            setattr(self, name, getattr(model, name))
        self.calls = []

    def forward(self, x, t, y):
        assert len(x) == len(y) == len(t)
        self.calls.append((float(t[0]) / 1000, False))
        return self.inner(x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        self.calls.append((float(t[0]) / 1000, True))
        return self.inner.forward_with_cfg(x, t, y, cfg_scale, guided_channels=guided_channels)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 9), ("ddim", 10), ("dpm-solver++", 8), ("euler", 8),
                                            ("heun", 5), ("sde", 8)])
def test_guidance_interval_guides_exactly_the_steps_inside_it(sampler, steps):
    model = GuidanceRecorder(tiny_dit(learn_sigma=sampler in ("ddpm", "ddim", "dpm-solver++")))
    kwargs = dict(sampler=sampler, num_steps=steps, cfg_scale=3.0)
    full = sample(model, [0, 2], generator=_generators(2), **kwargs)
    assert all(guided for _, guided in model.calls)
    model.calls.clear()
    limited = sample(model, [0, 2], generator=_generators(2), guidance_interval=(0.3, 0.7), **kwargs)
    guided = [guided for _, guided in model.calls]
    assert guided == [0.3 <= level <= 0.7 for level, _ in model.calls]
    assert any(guided) and not all(guided)
    assert (limited - full).abs().max() > 1e-3
    # Off, and an interval covering every level, are the same draw, bit for bit.
    model.calls.clear()
    everywhere = sample(model, [0, 2], generator=_generators(2), guidance_interval=(0.0, 1.0), **kwargs)
    assert torch.equal(everywhere, full) and all(guided for _, guided in model.calls)
    # An interval no step is in: the unguided sampler.
    nowhere = sample(model, [0, 2], generator=_generators(2), guidance_interval=(5e-4, 5e-4), **kwargs)
    plain = sample(model, [0, 2], generator=_generators(2), **dict(kwargs, cfg_scale=1.0))
    assert torch.equal(nowhere, plain)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_interval_equals_adm_with_guidance_on_those_steps(sampler):
    """ADM's loops with the guided model on the steps at t / 1000 in [0.25, 0.6], the conditional one elsewhere."""
    model = tiny_dit(in_channels=4)
    labels, interval, steps = [1, 3], (0.25, 0.6), 10
    guided_fn, plain_fn = _oracle_model(model, labels, 3.0, 3), _oracle_model(model, labels)

    def model_fn(x, t):
        return (guided_fn if interval[0] <= t / 1000 <= interval[1] else plain_fn)(x, t)

    ours = sample(model, labels, sampler=sampler, num_steps=steps, cfg_scale=3.0, guided_channels=3,
                  guidance_interval=interval, generator=_generators(2))
    gens = _generators(2)
    start = _noise(gens, ours.shape)
    if sampler == "ddpm":
        oracle = adm.ddpm_loop(model_fn, start, steps, lambda: _noise(gens, ours.shape))
    else:
        oracle = adm.ddim_loop(model_fn, start, steps)
    assert _deviation(ours, oracle) < 1e-4


def test_guidance_interval_and_shift_are_checked():
    model = tiny_dit()
    with pytest.raises(ValueError, match="guidance interval must be two noise levels"):
        sample(model, [0], num_steps=2, cfg_scale=2.0, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="the timestep shift applies to the samplers euler, heun, sde, not to"):
        sample(model, [0], num_steps=2, flow_shift=3.0)
    with pytest.raises(ValueError, match="timestep shift must be a positive number"):
        sample(tiny_dit(learn_sigma=False), [0], sampler="euler", num_steps=2, flow_shift=0.0)
    with pytest.raises(ValueError, match="the sde sampler takes an integer number of steps >= 2, got 1"):
        sample(tiny_dit(learn_sigma=False), [0], sampler="sde", num_steps=1)
