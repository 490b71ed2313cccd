"""The typed config schema: parsed once, typed values, errors naming the key, and config.yaml round trips."""
from dataclasses import fields
from pathlib import Path

import pytest

from dit_gspn.training.config import (DEFAULTS, ConfigError, DataConfig, RunConfig, TrainConfig, config_changes,
                                      load_config, parse_config, read_saved_config)
from dit_gspn.checkpoint.folder import write_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_schema_and_every_field_is_a_key():
    assert list(DEFAULTS) == [f.name for f in fields(RunConfig)]
    assert list(DEFAULTS["train"]) == [f.name for f in fields(TrainConfig)]
    assert list(DEFAULTS["data"]) == [f.name for f in fields(DataConfig)]
    assert DEFAULTS["model"] == {"name": "GSPN-XL/2"} and DEFAULTS["train"]["betas"] == [0.9, 0.999]


def test_values_are_typed_once_and_the_objective_is_resolved():
    config = parse_config(load_config(None, ["train.lr=1", "train.betas=[0, 0.5]", "train.grad_clip=2",
                                             "train.objective=flow", "train.steps=7", "logging.cfg_scale=4"]))
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0
    assert config.train.betas == (0.0, 0.5) and isinstance(config.train.grad_clip, float)
    assert config.train.steps == 7 and config.logging.cfg_scale == 4.0
    assert (config.logging.sampler, config.logging.sample_steps) == ("euler", 50)
    assert config.model.options["learn_sigma"] is False and config.objective.learn_sigma is False
    assert parse_config({}).logging.sampler == "ddpm"


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "train.steps must be an integer >= 1, got 'ten'"),
    ("train.steps=true", "train.steps must be an integer >= 1, got True"),
    ("train.lr=.nan", "train.lr must be a number > 0, got nan"),
    ("train.grad_clip=0", "train.grad_clip must be a number > 0 or null, got 0"),
    ("train.compile=1", "train.compile must be true or false, got 1"),
    ("train.flow_timesteps=cosine", "train.flow_timesteps must be one of uniform, logit_normal; got 'cosine'"),
    ("train.objective=edm", "train.objective must be one of ('ddpm', 'flow'), got 'edm'"),
    ("data.path=3", "data.path must be a string or null, got 3"),
    ("logging.sample_steps=0", "logging.sample_steps must be an integer >= 1 or null, got 0"),
    ("logging.guidance_interval=[0.5]", "logging.guidance_interval: "),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("run_dir=", "run_dir must be a folder path, got None"),
])
def test_each_mistake_names_its_key(override, message):
    with pytest.raises(ConfigError) as info:
        parse_config(load_config(None, [override]))
    assert message in str(info.value)


def test_a_saved_config_reads_back_to_the_same_run(tmp_path):
    config = parse_config(load_config(REPO / "configs" / "demo.yaml", ["train.lr=2e-4", "logging.sample_classes=[1]"]))
    write_config(tmp_path, config.to_dict())
    saved = read_saved_config(tmp_path)
    assert parse_config(saved) == config and saved == config.to_dict()
    assert config_changes(saved, config.to_dict()) == {}
    changed = parse_config({**saved, "train": {**saved["train"], "lr": 3e-4, "steps": 1}})
    assert config_changes(saved, changed.to_dict()) == {"train.lr": (2e-4, 3e-4)}  # steps is resume-safe


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    config = parse_config(load_config(preset))
    assert config.logging.sampler in config.objective.samplers
