"""Training configuration: YAML files merged over the defaults, then ``section.key=value`` overrides.

Every key a run can use is in ``DEFAULTS``; an unknown key (a typo) is an error that names it and
the keys it could have meant, never a silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path

import yaml

from dit_gspn.diffusion import OBJECTIVES, check_sampler, default_num_steps, default_sampler
from dit_gspn.diffusion.flow import TIMESTEP_SAMPLING
from dit_gspn.sampling.sampler import check_guidance_interval


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; researchers write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)

DEFAULTS: dict = {
    "run_dir": "runs/default",
    "seed": 0,
    "model": {
        "name": "GSPN-XL/2",
        # Any further DiT constructor argument (hidden_size, depth, gspn_chunk, ...) may be set here.
        # input_size, in_channels and num_classes default to what the data says.
    },
    "data": {
        "kind": "latents",          # "latents" (a folder written by extract_latents.py) or "shapes" (built in)
        "path": None,               # the latent folder
        "flip": True,               # use the flipped copies too (latents: needs them extracted)
        "num_per_class": 500,       # shapes: images per class
        "image_size": 32,           # shapes: pixels
        "num_workers": 4,
    },
    "train": {
        "steps": 400_000,
        "global_batch_size": 256,   # over all processes and accumulation steps, as DiT counts it
        "grad_accum_steps": 1,
        "lr": 1e-4,                 # DiT: AdamW, lr 1e-4, no weight decay, constant
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "warmup_steps": 0,
        "grad_clip": None,          # max gradient norm; None: no clipping (DiT clips nothing)
        "objective": "ddpm",        # "ddpm": DiT's epsilon + learned variance, MSE + VLB; "flow": SiT's linear
                                    # flow matching (velocity, MSE; the model then has learn_sigma=False)
        "flow_timesteps": "uniform",  # flow: how noise levels are drawn, "uniform" or "logit_normal" (SD3)
        "flow_shift": 1.0,          # flow: SD3's timestep shift of the drawn levels, s' = k s / (1 + (k-1) s); 1: none
        "snr_gamma": None,          # ddpm: Min-SNR weighting of the epsilon MSE (e.g. 5.0); None: DiT's plain MSE
        "mixed_precision": "no",    # "no", "bf16" or "fp16"
        "gradient_checkpointing": False,
        "compile": False,           # torch.compile the model
        "ema_decay": 0.9999,
        "ema_warmup": False,        # decay min(ema_decay, (1 + step) / (10 + step)) as diffusers' EMAModel; DiT: off
        "cpu": False,               # force CPU even where a GPU is present
        "time_limit_minutes": None, # stop early (with a checkpoint and a grid) after this long; resume continues
    },
    "checkpoint": {
        "every": 50_000,            # optimizer steps between checkpoints (and one at the end)
        "keep_last": 3,
    },
    "logging": {
        "every": 100,               # steps between TensorBoard scalars and the bar's loss
        "tensorboard": True,
        "sample_every": 0,          # steps between labelled sample grids (0: only at the end)
        "sample_classes": None,     # class ids in the grid; None: up to 10 spread over the classes
        "samples_per_class": 1,
        "sampler": None,            # None: the objective's default (ddpm: "ddpm", flow: "euler")
        "sample_steps": None,       # None: the sampler's default (250 for ddpm, 50 for euler, ...)
        "cfg_scale": 1.0,
        "guidance_interval": None,  # [low, high]: guide only steps at noise levels (timestep / 1000) in it
        "flow_shift": 1.0,          # flow samplers: SD3's timestep shift of the grid; 1: none
    },
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the file and what was expected."""


def _merge(base: dict, update: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base and not where.startswith("model"):
            close = difflib.get_close_matches(key, base, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known keys: {', '.join(base)}"
            raise ConfigError(f"{source}: unknown key {where + key!r}{hint}")
        if isinstance(base.get(key), dict) and not isinstance(value, dict):
            raise ConfigError(f"{source}: {where + key!r} must be a mapping, got {value!r}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}{key}.", source)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 3e-4}}``; the value is read as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=1000")
    dotted, raw = text.split("=", 1)
    value = _yaml(raw) if raw.strip() else None
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, updated by the YAML file at ``path`` (if any), then by each ``key=value`` override."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = _yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        config = _merge(config, loaded, "", str(path))
    for text in overrides:
        config = _merge(config, parse_override(text), "", f"override {text!r}")
    return config


def complete_config(config: dict) -> dict:
    """``config`` (a possibly partial dict) merged over DEFAULTS, with unknown keys rejected."""
    return _merge(DEFAULTS, config, "", "config")


def resolve_objective(config: dict) -> dict:
    """``config`` (complete) with its objective checked against the settings that depend on it, and
    ``logging.sampler`` filled in with the objective's default sampler when it is None."""
    config = copy.deepcopy(config)
    train, logging, model = config["train"], config["logging"], config["model"]
    objective = train["objective"]
    if objective not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "flow":
        if train["snr_gamma"] is not None:
            raise ConfigError("train.snr_gamma (Min-SNR) weights the epsilon MSE of train.objective=ddpm; "
                              "unset it for train.objective=flow")
        if train["flow_timesteps"] not in TIMESTEP_SAMPLING:
            raise ConfigError(f"train.flow_timesteps must be one of {TIMESTEP_SAMPLING}, "
                              f"got {train['flow_timesteps']!r}")
    for section, key in (("train", "flow_shift"), ("logging", "flow_shift")):
        shift = config[section][key]
        if not isinstance(shift, (int, float)) or not shift > 0 or (objective != "flow" and shift != 1):
            raise ConfigError(f"{section}.{key} must be a number > 0 for train.objective=flow and 1 (no shift) "
                              f"otherwise, got {shift!r}")
    learn_sigma = objective == "ddpm"
    if model.get("learn_sigma", learn_sigma) != learn_sigma:
        raise ConfigError(f"model.learn_sigma={model['learn_sigma']} does not fit train.objective={objective}: "
                          f"{'ddpm learns the variance' if learn_sigma else 'flow predicts a velocity only'}; "
                          f"leave model.learn_sigma unset")
    model["learn_sigma"] = learn_sigma
    if logging["sampler"] is None:
        logging["sampler"] = default_sampler(objective)
    if logging["sample_steps"] is None:
        logging["sample_steps"] = default_num_steps(logging["sampler"])
    try:
        check_guidance_interval(logging["guidance_interval"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"logging.guidance_interval: {err}") from err
    try:
        check_sampler(logging["sampler"], objective)
    except ValueError as err:
        raise ConfigError(f"logging.sampler: {err}") from err
    return config


def dump_config(config: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
