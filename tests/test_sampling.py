"""Sampling: the samplers against ADM's formulas and diffusers, CFG, grids, checkpoints, and batch sampling."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from dit_gspn.sampling import sample, save_labelled_grid


class StandIn(nn.Module):
    """A tiny class-conditional epsilon(+variance) model with DiT's interface, built for these tests.

    ``forward_with_cfg`` follows DiT: the batch is [cond half; uncond half], guidance on the first
    ``guided_channels`` channels (all epsilon channels by default)."""

    def __init__(self, in_channels=3, num_classes=5, input_size=8, learn_sigma=True):
        super().__init__()
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size
        out = 2 * in_channels if learn_sigma else in_channels
        self.conv = nn.Conv2d(in_channels, out, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, out)
        self.time = nn.Linear(1, out)

    def forward(self, x, t, y):
        c = self.label(y) + self.time(t.float()[:, None] / 1000)
        return torch.tanh(0.3 * self.conv(x) + c[:, :, None, None])

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        ch = guided_channels or self.in_channels
        eps, rest = out[:, :ch], out[:, ch:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _adm_ddpm(model, labels, num_steps, generators):
    """ADM's respaced p_sample loop with learned-range variance, written out in float64 (the oracle)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1 - betas)
    use = np.linspace(0, 999, num_steps).round().astype(int)[::-1]
    n, ch = len(labels), model.in_channels
    x = randn_tensor((n, ch, 8, 8), generator=generators, dtype=torch.float32).double()
    for k, t in enumerate(use):
        prev = use[k + 1] if k + 1 < len(use) else -1
        a_t, a_prev = acp[t], (acp[prev] if prev >= 0 else 1.0)
        beta = 1 - a_t / a_prev
        out = model(x.float(), torch.full((n,), int(t)), torch.as_tensor(labels)).double()
        eps, v = out[:, :ch], out[:, ch:]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        post_var = max(beta * (1 - a_prev) / (1 - a_t), 1e-20)
        frac = (v + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
        noise = randn_tensor((n, ch, 8, 8), generator=generators, dtype=torch.float32).double()
        x = mean + (torch.exp(0.5 * log_var) * noise if prev >= 0 else 0)
    return x


def test_ddpm_matches_adm_respaced_learned_variance():
    model = StandIn()
    labels = [0, 3, 4]
    ours = sample(model, labels, num_steps=6, generator=_generators(3))
    oracle = _adm_ddpm(model, labels, 6, _generators(3))
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++"])
def test_deterministic_samplers_match_diffusers_loop(name):
    model = StandIn()
    labels = torch.tensor([1, 2])
    ours = sample(model, labels, sampler=name, num_steps=7, generator=_generators(2))
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  timestep_spacing="linspace")
    if name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    else:
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(7)
    x = randn_tensor((2, 3, 8, 8), generator=_generators(2))
    for t in sched.timesteps:
        eps = model(x, torch.full((2,), int(t)), labels)[:, :3]
        x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x)


def test_cfg_scale_one_equals_conditional_model():
    model = StandIn()
    plain = sample(model, [0, 1, 2], num_steps=5, cfg_scale=1.0, generator=_generators(3))
    with torch.no_grad():
        guided = sample(model, [0, 1, 2], num_steps=5, cfg_scale=1.0 + 1e-7, generator=_generators(3))
    torch.testing.assert_close(plain, guided, rtol=1e-4, atol=1e-4)
    strong = sample(model, [0, 1, 2], num_steps=5, cfg_scale=4.0, generator=_generators(3))
    assert (strong - plain).abs().max() > 1e-2  # guidance does change the result


def test_per_sample_generators_make_samples_independent_of_the_batch():
    model = StandIn()
    gens = _generators(4, seed=10)
    together = sample(model, [0, 1, 2, 3], num_steps=4, generator=gens)
    alone = sample(model, [2], num_steps=4, generator=_generators(4, seed=10)[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)


def test_non_square_size_and_model_without_learned_sigma():
    model = StandIn(learn_sigma=False)
    out = sample(model, [0, 1], num_steps=3, size=(6, 10), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 6, 10) and torch.isfinite(out).all()


def test_sample_errors_name_the_problem():
    model = StandIn()
    with pytest.raises(ValueError, match="unknown sampler"):
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
