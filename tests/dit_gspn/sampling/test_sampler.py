"""Sampling: the samplers against ADM's formulas and diffusers, CFG, grids, checkpoints, and batch sampling."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from helpers import adm_sampling as adm

from helpers.entry_points import load_script
from dit_gspn.errors import UserError
from dit_gspn.models import create_model
from dit_gspn.ops.gspn_scan import gspn_scan_impl
from dit_gspn.sampling import sample, save_labelled_grid
from dit_gspn.image_npz import read_npz, write_npz
from dit_gspn.sampling.batch import (MANIFEST_DEFAULTS, BatchPlan, assemble, class_labels, index_seed, run_batch,
                                     shard_path)
from dit_gspn.work_folder import MANIFEST, check_manifest
from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.sampling.model_loader import load_model
from dit_gspn.vae import DEFAULT_VAE, decode, load_vae, vae_scale_factor
from helpers.repo import REPO


def tiny_dit(in_channels=3, num_classes=5, input_size=8, learn_sigma=True, mixer="gspn", seed=0):
    """A 2-block DiT small enough for CPU tests; its zero-initialised output layer gets random weights so
    that samples depend on the model."""
    torch.manual_seed(seed)
    model = create_model("GSPN-S/2" if mixer == "gspn" else "DiT-S/2", depth=2, hidden_size=32, num_heads=2,
                         input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                         learn_sigma=learn_sigma)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _reference_scan():
    """The pure PyTorch scan, so these tests neither build nor depend on the compiled kernels."""
    with gspn_scan_impl("reference"):
        yield


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


def test_labelled_grid_writes_tiles_and_captions(tmp_path):
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    path = save_labelled_grid(images, [0, 1, 2, 3, 4], tmp_path / "grid.png",
                              class_names=["zero", "one", "two", "three", "four"], nrow=3)
    grid = np.asarray(Image.open(path))
    # 32x32 tiles are enlarged 3x to stay readable: 3 columns, 2 rows of 96x96 tiles plus caption strips.
    assert grid.shape[1] == 3 * (96 + 4) and grid.shape[0] == 2 * (96 + 16 + 4)
    first = grid[2:98, 2:98]
    expected = ((images[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first[::3, ::3], expected)
    caption = grid[98:114, 2:98]
    assert (caption < 128).any(), "no caption text drawn under the first tile"
    with pytest.raises(ValueError, match="class id 7 has no name"):
        save_labelled_grid(images[:1], [7], tmp_path / "bad.png", class_names=["a"])


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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and decoding
# ----------------------------------------------------------------------------------------------------------

def write_training_checkpoint(path, model, class_names=None, vae=None, latent_scale=1.0, image_size=(8, 8)):
    """The layout the trainer writes: model/ and ema/ (save_pretrained) and sampling.json."""
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(path / "model")
    ema.save_pretrained(path / "ema")
    SamplingInfo(vae, latent_scale, image_size, model.num_classes, class_names).write(path / "sampling.json")
    return ema


def test_load_training_checkpoint_ema_and_raw_weights(tmp_path):
    model = tiny_dit(num_classes=3)
    ema = write_training_checkpoint(tmp_path, model, class_names=["a", "b", "c"])
    loaded, info = load_model(tmp_path)
    raw, _ = load_model(tmp_path, weights="model")
    for ours, theirs in ((loaded, ema), (raw, model)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert info == SamplingInfo(None, 1.0, (8, 8), 3, ["a", "b", "c"])


def test_load_save_pretrained_folder_and_dit_state_dict(tmp_path):
    model = tiny_dit(in_channels=4, num_classes=3)
    model.save_pretrained(tmp_path / "plain")
    _, info = load_model(tmp_path / "plain")
    assert info.vae == DEFAULT_VAE and info.latent_scale == 0.18215 and info.image_size == (64, 64)

    # An official-style DiT state dict (DiT-S/2 at 64 px = 8x8 latents): the size comes from pos_embed.
    torch.manual_seed(1)
    dit = create_model("DiT-S/2", input_size=8, num_classes=7)
    torch.save(dit.state_dict(), tmp_path / "DiT-S-2-64x64.pt")
    loaded, info = load_model(tmp_path / "DiT-S-2-64x64.pt", model_name="DiT-S/2", num_classes=7)
    assert loaded.input_size == 8 and info.image_size == (64, 64)
    torch.testing.assert_close(loaded.final_layer.adaLN_modulation[-1].weight,
                               dit.final_layer.adaLN_modulation[-1].weight, rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither sampling.json"):
        load_model(tmp_path)
    (tmp_path / "sampling.json").write_text(json.dumps({"vae": None}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['latent_scale', 'image_size', 'num_classes'\]"):
        load_model(tmp_path)
    # A sampling.json from before flow matching: DiT's objective; an unknown one is named with the file.
    info = {"vae": None, "latent_scale": 1.0, "image_size": [8, 8], "num_classes": 3}
    (tmp_path / "sampling.json").write_text(json.dumps(info))
    assert SamplingInfo.read(tmp_path / "sampling.json").objective == "ddpm"
    (tmp_path / "sampling.json").write_text(json.dumps({**info, "objective": "edm"}))
    with pytest.raises(ValueError, match=r"sampling.json: objective 'edm' is not one of ddpm, flow"):
        SamplingInfo.read(tmp_path / "sampling.json")
    with pytest.raises(FileNotFoundError, match="could not load the VAE 'no-such/vae'.*--vae DIR"):
        load_vae("no-such/vae")


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def test_decode_batches_through_the_vae_with_the_latent_scale():
    vae = tiny_vae()
    latents = torch.randn(5, 4, 4, 4)
    info = SamplingInfo("local", 0.18215, (8, 8), 3)
    images = decode(latents, info, vae, batch_size=2)
    with torch.no_grad():
        expected = vae.decode(latents / 0.18215).sample.clamp(-1, 1)
    assert images.shape == (5, 3, 8, 8)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)
    assert vae_scale_factor(vae) == 2


# ----------------------------------------------------------------------------------------------------------
# Batch sampling: the plan, the npz layout, and sample.py run as real processes
# ----------------------------------------------------------------------------------------------------------

def test_class_plans_and_per_index_seeds():
    uniform = class_labels(1000, 10, "uniform", seed=3)
    assert uniform.min() == 0 and uniform.max() == 9 and not np.array_equal(uniform, class_labels(1000, 10, seed=4))
    balanced = class_labels(1000, 10, "balanced", seed=3)
    assert np.bincount(balanced).tolist() == [100] * 10
    assert len({index_seed(0, i) for i in range(1000)} | {index_seed(1, i) for i in range(1000)}) == 2000
    plan = BatchPlan(num_samples=10, num_classes=3, shard_size=3)
    shards = [k for rank in range(3) for k in plan.shards_of(rank, 3)]
    assert sorted(shards) == [0, 1, 2, 3]
    assert np.concatenate([plan.shard_indices(k) for k in range(4)]).tolist() == list(range(10))


def test_npz_layout_round_trips_and_adm_reads_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 12, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9])
    path = write_npz(tmp_path / "s.npz", images, labels)
    got, got_labels = read_npz(path)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    with np.load(path) as raw:  # what ADM's evaluator and sample script see
        assert raw.files == ["arr_0", "arr_1"] and raw["arr_0"].dtype == np.uint8
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        write_npz(tmp_path / "bad.npz", images.astype(np.float32))


NUM, SHARD, STEPS = 12, 2, 6
BATCH_ARGS = ["--num-steps", str(STEPS), "--num-samples", str(NUM), "--batch-size", str(SHARD),
              "--class-mode", "balanced", "--seed", "7", "--sampler", "ddpm", "--cfg-scale", "2"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIT_GSPN_SCAN_IMPL="reference", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _sample_py(*args, launcher=(sys.executable,), **kwargs):
    return subprocess.run([*launcher, str(REPO / "sample.py"), *map(str, args)], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def batch_ckpt(tmp_path_factory):
    """A tiny GSPN-DiT training checkpoint and its uninterrupted one-process batch run (the oracle)."""
    root = tmp_path_factory.mktemp("batch")
    with gspn_scan_impl("reference"):
        write_training_checkpoint(root / "ckpt", tiny_dit(num_classes=4), class_names=["w", "x", "y", "z"])
    done = _sample_py("--ckpt", root / "ckpt", *BATCH_ARGS, "--out", root / "ref.npz")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_two_process_run_draws_every_index_once_and_equals_one_process(batch_ckpt):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    out = batch_ckpt / "two.npz"
    done = _sample_py("--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out, "--keep-shards", launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    indices, ranks = [], set()
    for shard in sorted((batch_ckpt / "two.npz.shards").glob("shard_*.npz")):
        with np.load(shard) as data:
            indices += data["indices"].tolist()
            ranks.add(int(data["rank"]))
    assert sorted(indices) == list(range(NUM)) and len(indices) == NUM
    assert ranks == {0, 1}
    ref_images, ref_labels = read_npz(batch_ckpt / "ref.npz")
    images, labels = read_npz(out)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert images.shape == (NUM, 8, 8, 3) and np.bincount(labels).tolist() == [3, 3, 3, 3]


def test_killed_and_resumed_run_equals_uninterrupted_run(batch_ckpt):
    out = batch_ckpt / "killed.npz"
    shard_dir = batch_ckpt / "killed.npz.shards"
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--ckpt", str(batch_ckpt / "ckpt"),
                             *BATCH_ARGS, "--out", str(out)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(shard_dir.glob("shard_*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in shard_dir.glob("shard_*.npz")}
    assert not out.exists() and 1 <= len(finished) < NUM // SHARD, "the kill did not land mid-run"

    done = _sample_py("--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out, "--keep-shards")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {len(finished)} finished" in done.stdout
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was drawn again"
    ref_images, ref_labels = read_npz(batch_ckpt / "ref.npz")
    images, labels = read_npz(out)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_the_streamed_npz_is_bitwise_the_file_np_savez_writes_from_whole_arrays(tmp_path):
    """assemble() writes one shard at a time; the oracle concatenates every shard in memory and calls np.savez."""
    plan = BatchPlan(num_samples=11, num_classes=3, shard_size=4, seed=2)  # shards of 4, 4 and 3
    shard_dir = tmp_path / "out.npz.shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 6, 10, 3), dtype=np.uint8)
    for k in range(plan.num_shards):
        idx = plan.shard_indices(k)
        np.savez(shard_path(shard_dir, k), images=images[idx], labels=plan.labels()[idx], indices=idx)
    streamed = assemble(plan, shard_dir, tmp_path / "out.npz")
    np.savez(tmp_path / "in_memory.npz", images, plan.labels())
    assert streamed.read_bytes() == (tmp_path / "in_memory.npz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_memory.npz", "out.npz", "out.npz.shards"]
    assert sorted(p.name for p in shard_dir.iterdir()) == [f"shard_{k:06d}.npz" for k in range(3)]  # no partial


#: Code run before sample.py by ``sample_py_patched``: kill the process after the second shard went into the final
#: .npz, or after the .npz before its provenance file, or hold it (and the --out's lock) after its first shard.
KILL_DURING_ASSEMBLY = ("import dit_gspn.image_npz as m\n"
                        "append = m.ImageNpzWriter.append\n"
                        "def killing(self, *a):\n"
                        "    append(self, *a)\n"
                        f"    if self.written > 2 * {SHARD}: os.kill(os.getpid(), signal.SIGKILL)\n"
                        "m.ImageNpzWriter.append = killing\n")
KILL_BEFORE_PROVENANCE = ("import dit_gspn.sampling.batch as m\n"
                          "m.write_provenance = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n")
HOLD_AFTER_FIRST_SHARD = ("import time, dit_gspn.sampling.batch as m\n"
                          "save = m.savez_atomically\n"
                          "def holding(*a, **k):\n"
                          "    save(*a, **k)\n"
                          "    time.sleep(600)\n"
                          "m.savez_atomically = holding\n")


def sample_py_patched(patch: str, *args, popen: bool = False):
    """sample.py in a subprocess that runs ``patch`` first (one of the constants above): its CompletedProcess,
    or with ``popen`` the running Popen."""
    code = (f"import os, runpy, signal, sys\n{patch}sys.argv = ['sample.py', *sys.argv[1:]]\n"
            f"runpy.run_path({str(REPO / 'sample.py')!r}, run_name='__main__')\n")
    command = [sys.executable, "-c", code, *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name or ".tmp" in p.name)


def test_a_kill_during_assembly_then_the_same_command_gives_the_same_file_and_no_partial_one(batch_ckpt, tmp_path):
    args = ["--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", tmp_path / "samples.npz"]
    killed = sample_py_patched(KILL_DURING_ASSEMBLY, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "samples.npz").exists() and _leftovers(tmp_path) == ["samples.npz.partial"]
    done = _sample_py(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "samples.npz").read_bytes() == (batch_ckpt / "ref.npz").read_bytes()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "samples.npz.shards").exists()
    assert json.loads((tmp_path / "samples.provenance.json").read_text())["count"] == NUM


def test_a_kill_before_the_provenance_file_or_a_deleted_output_is_finished_by_the_same_command(batch_ckpt, tmp_path):
    out, provenance = tmp_path / "samples.npz", tmp_path / "samples.provenance.json"
    args = ["--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out]
    killed = sample_py_patched(KILL_BEFORE_PROVENANCE, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert out.is_file() and not provenance.exists() and (tmp_path / "samples.npz.shards").is_dir()
    done = _sample_py(*args)  # the .npz without its provenance beside its shards: this job, unfinished
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes() and provenance.is_file()
    assert f"skipped {NUM // SHARD} finished" in done.stdout  # nothing was drawn again

    out.unlink()  # the user deletes the samples; the provenance file stays behind
    again = _sample_py(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "describes no samples.npz any more; it will be replaced" in again.stderr
    assert out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes()
    refused = _sample_py(*args)  # finished: the same command now refuses to overwrite it
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_resume_with_other_settings_is_refused(batch_ckpt):
    shard_dir = batch_ckpt / "other.npz.shards"
    check_manifest(shard_dir, {"cfg_scale": 2.0}, write=True)
    with pytest.raises(ValueError, match="cfg_scale: 2.0 then, 4.0 now"):
        check_manifest(shard_dir, {"cfg_scale": 4.0}, write=True)


def test_a_manifest_from_before_the_guidance_interval_and_shift_resumes_with_them_off(batch_ckpt):
    shard_dir = batch_ckpt / "older.npz.shards"
    check_manifest(shard_dir, {"cfg_scale": 2.0}, write=True)  # written without the two newer keys
    newer = {"cfg_scale": 2.0, "guidance_interval": None, "flow_shift": 1.0}
    check_manifest(shard_dir, newer, write=True, defaults=MANIFEST_DEFAULTS)
    with pytest.raises(ValueError, match=r"flow_shift: 1.0 then, 3.0 now"):
        check_manifest(shard_dir, {**newer, "flow_shift": 3.0}, write=True, defaults=MANIFEST_DEFAULTS)


def test_grid_mode_writes_labelled_png_at_a_non_square_size(batch_ckpt, tmp_path, capsys):
    sample_main = _import_sample_py()
    assert sample_main(["--ckpt", str(batch_ckpt / "ckpt"), "--num-steps", "3", "--classes", "1", "3",
                        "--per-class", "2", "--image-size", "8", "16", "--weights", "model",
                        "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    # 2 per row, 2 rows; 8x16 tiles enlarged 6x to 48x96, plus padding and the caption strip
    assert grid.size == (2 * (96 + 4), 2 * (48 + 16 + 4))
    assert "classes [1, 3]" in capsys.readouterr().out


def test_cli_records_the_guidance_interval_and_shift_and_refuses_bad_ones(batch_ckpt, tmp_path):
    sample_main = _import_sample_py()
    out = tmp_path / "interval.npz"
    assert sample_main(["--ckpt", str(batch_ckpt / "ckpt"), "--num-steps", "3", "--num-samples", "2",
                        "--batch-size", "2", "--cfg-scale", "2", "--guidance-interval", "0.2", "0.6",
                        "--keep-shards", "--out", str(out)]) == 0
    settings = json.loads((tmp_path / "interval.npz.shards" / MANIFEST).read_text())
    assert settings["guidance_interval"] == [0.2, 0.6] and settings["flow_shift"] == 1.0
    assert settings["num_steps"] == 3 and settings["sampler"] == "ddpm"
    for bad, message in ((["--guidance-interval", "0.7", "0.1"], "--guidance-interval: the guidance interval"),
                         (["--flow-shift", "0"], "--flow-shift: the timestep shift must be")):
        with pytest.raises(UserError, match=message):
            sample_main(["--ckpt", str(batch_ckpt / "ckpt"), *bad])


def _import_sample_py():
    return load_script("sample").main


def test_bf16_batch_sampling_stays_close_to_float32(tmp_path):
    model = tiny_dit(num_classes=3)
    plan = BatchPlan(num_samples=4, num_classes=3, shard_size=2, seed=1)
    info = SamplingInfo(None, 1.0, (8, 8), 3)
    paths = {}
    for bf16 in (False, True):
        paths[bf16] = run_batch(model, plan, tmp_path / f"bf16_{bf16}.npz", info=info, settings={}, bf16=bf16,
                                num_steps=4, sampler="ddim")
    full, _ = read_npz(paths[False])
    half, _ = read_npz(paths[True])
    diff = np.abs(full.astype(int) - half.astype(int))
    assert diff.mean() < 2 and diff.max() > 0  # bf16 did run, and gives nearly the same pixels
    with pytest.raises(FileExistsError, match="already exists"):
        run_batch(model, plan, paths[True], info=info, settings={}, num_steps=4)
