"""A new mixer, sampler and dataset kind are each one registration made here, in a test file, with no project
file edited: the config checks their options as it checks its own keys, a run trains on them, and the
checkpoint samples with them."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.diffusion import SAMPLERS, SamplerSpec, SamplingSchedule, register_sampler
from dit_gspn.models import MIXERS, TokenMixer, register_mixer
from dit_gspn.sampling import sample
from dit_gspn.sampling.model_loader import load_model
from dit_gspn.training import ConfigError, load_config, parse_config, train
from dit_gspn.training.datasets import DATASETS, TrainingData, register_dataset
from helpers.repo import REPO


class LeftNeighbourMixer(TokenMixer):
    """Each token mixed with the token ``reach`` places to its left on its row: a linear map of the pair."""

    def __init__(self, dim: int, reach: int = 1):
        super().__init__()
        self.reach = reach
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, tokens, grid):
        b, n, c = tokens.shape
        rows = tokens.view(b, grid[0], grid[1], c)
        left = torch.roll(rows, self.reach, dims=2).reshape(b, n, c)
        return self.proj(torch.cat([tokens, left], dim=-1))


class EulerSteps:
    """The flow ODE in equal Euler steps from noise level 1 to 0, written out (a diffusers-like scheduler)."""

    def __init__(self, num_steps: int):
        self.levels = torch.linspace(1.0, 0.0, num_steps + 1)
        self.timesteps = self.levels[:-1] * 1000

    def step(self, velocity, timestep, x):
        i = int((self.timesteps == timestep).nonzero())
        return SimpleNamespace(prev_sample=x + (self.levels[i + 1] - self.levels[i]) * velocity)


def euler_steps(num_steps, *, clip_denoised, learn_sigma, flow_shift):
    scheduler = EulerSteps(num_steps)
    return SamplingSchedule(scheduler, scheduler.timesteps)


def stripes(*, seed: int, num_per_class: int = 8, image_size: int = 8) -> TrainingData:
    """Three classes of images, each its own stripe direction, with noise from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, image_size)
    patterns = [ramp.expand(image_size, image_size), ramp[:, None].expand(image_size, image_size),
                (ramp[:, None] + ramp) / 2]
    images = torch.stack([patterns[k] for k in range(3) for _ in range(num_per_class)])
    images = (images[:, None].expand(-1, 3, -1, -1) + 0.1 * torch.randn(len(images), 3, image_size, image_size,
                                                                            generator=g)).clamp(-1, 1)
    labels = torch.arange(3).repeat_interleave(num_per_class)
    info = SamplingInfo(vae=None, latent_scale=1.0, image_size=(image_size, image_size), num_classes=3,
                        class_names=["rows", "columns", "diagonal"])
    return TrainingData(TensorDataset(images, labels), 3, image_size, 3, info)


@pytest.fixture
def registered():
    """The three registrations, undone afterwards."""
    register_mixer("left-neighbour")(LeftNeighbourMixer)
    register_sampler(SamplerSpec("euler-steps", objective="flow", build=euler_steps, default_steps=5))
    register_dataset("stripes")(stripes)
    yield
    MIXERS.unregister("left-neighbour")
    SAMPLERS.unregister("euler-steps")
    DATASETS.unregister("stripes")


OVERRIDES = ["model.name=GSPN-S/4", "model.hidden_size=16", "model.depth=2", "model.num_heads=2",
             "model.mixer=left-neighbour", "model.mixer_kwargs.reach=2", "data.kind=stripes", "data.num_workers=0",
             "data.num_per_class=4", "train.objective=flow", "train.steps=2", "train.global_batch_size=4",
             "train.cpu=true", "logging.sampler=euler-steps", "logging.sample_steps=3", "logging.tensorboard=false",
             "checkpoint.every=2"]


def test_a_config_naming_them_is_checked_like_the_built_in_ones(registered):
    config = parse_config(load_config(None, OVERRIDES))
    assert config.model.options["mixer_kwargs"] == {"reach": 2} and config.data.options == {"num_per_class": 4,
                                                                                            "image_size": 8}
    assert (config.logging.sampler, config.logging.sample_steps) == ("euler-steps", 3)
    for override, message in [("model.mixer_kwargs.reech=1", "unknown key 'model.mixer_kwargs.reech' (did you mean "
                                                             "reach?); the left-neighbour mixer takes: reach"),
                              ("model.mixer_kwargs.reach=far", "model.mixer_kwargs.reach must be an integer, got 'far'"),
                              ("data.num_per_clas=2", "unknown key 'data.num_per_clas' (did you mean num_per_class?)"),
                              ("data.image_size=big", "data.image_size must be an integer, got 'big'"),
                              ("logging.sample_steps=0", "logging.sample_steps: the euler-steps sampler takes an "
                                                         "integer number of steps >= 1"),
                              ("train.objective=ddpm", "logging.sampler: sampler 'euler-steps' does not fit a model "
                                                       "trained with the 'ddpm' objective")]:
        with pytest.raises(ConfigError) as info:
            parse_config(load_config(None, [*OVERRIDES, override]))
        assert message in str(info.value), override


def test_a_run_trains_on_them_and_its_checkpoint_samples_with_them(registered, tmp_path):
    result = train(load_config(None, [*OVERRIDES, f"run_dir={tmp_path / 'run'}"]))
    assert result.step == 2 and result.grid.is_file()
    assert all(isinstance(block.mixer, LeftNeighbourMixer) and block.mixer.reach == 2 for block in result.model.blocks)
    assert "blocks.0.token_mixer.proj.weight" in result.model.state_dict()

    model, info = load_model(result.checkpoint)
    assert info.class_names == ["rows", "columns", "diagonal"] and info.objective == "flow"
    generator = [torch.Generator().manual_seed(i) for i in range(3)]
    ours = sample(model, [0, 1, 2], sampler="euler-steps", num_steps=4, generator=generator)
    # The built-in Euler sampler (diffusers' scheduler over the same equal steps) is the oracle.
    generator = [torch.Generator().manual_seed(i) for i in range(3)]
    builtin = sample(model, [0, 1, 2], sampler="euler", num_steps=4, generator=generator)
    torch.testing.assert_close(ours, builtin, rtol=1e-5, atol=1e-5)

    import sample as sample_command

    assert sample_command.main(["--ckpt", str(result.checkpoint), "--sampler", "euler-steps", "--classes", "0", "2",
                                "--out", str(tmp_path / "grid.png"), "--cpu"]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_a_plugin_module_registers_for_every_command(tmp_path):
    """$DIT_GSPN_PLUGINS: the modules every command imports first, so a registration made outside the project
    reaches train.py, sample.py and the rest without a wrapper script."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = REPO
    (tmp_path / "my_samplers.py").write_text(
        "from dit_gspn.diffusion import SamplerSpec, register_sampler, make_schedule\n"
        "register_sampler(SamplerSpec('my-euler', 'flow', lambda n, **kw: make_schedule('euler', n), 50))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}", "DIT_GSPN_PLUGINS": "my_samplers"}
    done = subprocess.run([sys.executable, str(repo / "sample.py"), "--help"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "my-euler" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([sys.executable, str(repo / "sample.py"), "--help"], capture_output=True, text=True,
                          env={**env, "DIT_GSPN_PLUGINS": "no_such_module"}, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: DIT_GSPN_PLUGINS: cannot import 'no_such_module' (No module named 'no_such_module'); put its folder "
        "on PYTHONPATH or install it"]
