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

from dit_gspn.cli import UserError
from dit_gspn.diffusion import OBJECTIVES, check_num_steps, check_sampler, default_num_steps, default_sampler
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
    "repa": {                       # representation alignment (REPA, Yu et al. 2025; dit_gspn/training/repa.py)
        "block": None,              # align the output of this block (1-based; REPA: 8 of 28 for XL); None: off
        "encoder": None,            # frozen encoder: TorchScript file, torch.hub FOLDER:entry, or dinov2_vitb14
        "coefficient": 0.5,         # weight of the negative cosine similarity in the loss (REPA: 0.5)
        "projector_dim": 2048,      # hidden width of the 3-layer SiLU MLP projector (REPA: 2048)
    },
    "checkpoint": {
        "every": 50_000,            # optimizer steps between checkpoints (and one at the end)
        "keep_last": 3,
    },
    "logging": {
        "every": 100,               # steps between TensorBoard scalars and the bar's loss
        "tensorboard": True,
        "sample_every": 0,          # steps between labelled sample grids (0: only at the end)
        "sample_classes": None,     # class ids in the grid; None: DiT's for 1000 classes, else up to 10 spread
        "samples_per_class": 1,
        "sampler": None,            # None: the objective's default (ddpm: "ddpm", flow: "euler")
        "sample_steps": None,       # None: the sampler's default (250 for ddpm, 50 for euler, ...)
        "cfg_scale": 1.0,
        "guidance_interval": None,  # [low, high]: guide only steps at noise levels (timestep / 1000) in it
        "flow_shift": 1.0,          # flow samplers: SD3's timestep shift of the grid; 1: none
        # FID (and IS) of the EMA's samples while training (dit_gspn/training/fid_monitor.py), with the grid's sampler:
        "fid_every": 0,             # steps between evaluations; 0: off
        "fid_samples": 1000,        # images per evaluation (a fixed seed and class list), shared by the processes
        "fid_batch_size": 64,       # images per sampling batch on each process
        "fid_reference": None,      # reference statistics .npz (python -m evaluation IMAGES --save-stats REF.npz)
        "fid_extractor": None,      # None: Inception; a TorchScript extractor file; "shapes-classifier" (built-in data)
        "fid_weights": None,        # Inception weights file (else $DIT_GSPN_INCEPTION_WEIGHTS, else the download)
    },
}


class ConfigError(UserError, ValueError):
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(key: str, value, *, integer: bool = False, minimum=None, below=None, optional: bool = False,
            above=None) -> None:
    """Check that ``value`` (config key ``key``) is a number in range, or raise a ConfigError saying what fits."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok_type = _is_int(value) if integer else (_is_int(value) or isinstance(value, float))
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if above is not None:
        bounds.append(f"> {above}")
    if below is not None:
        bounds.append(f"< {below}")
    want = f"{kind}{' ' + ' and '.join(bounds) if bounds else ''}{' or null' if optional else ''}"
    if not ok_type or value != value:  # NaN fails every range
        raise ConfigError(f"{key} must be {want}, got {value!r}")
    if ((minimum is not None and value < minimum) or (above is not None and value <= above)
            or (below is not None and value >= below)):
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def _flag(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


MIXED_PRECISION = ("no", "bf16", "fp16")
DATA_KINDS = ("latents", "shapes")


def _check_model_section(model: dict) -> None:
    import inspect

    from dit_gspn.models import DiT, DiT_models

    name = model.get("name")
    if name not in DiT_models:
        close = difflib.get_close_matches(str(name), DiT_models, n=3)
        raise ConfigError(f"model.name {name!r} is not a zoo model"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; known: {', '.join(DiT_models)}")
    accepted = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]
    for key, value in model.items():
        if key == "name":
            continue
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3)
            raise ConfigError(f"unknown key 'model.{key}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + f"; DiT takes: {', '.join(accepted)}")
    for key in ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "num_classes",
                "gspn_proxy_ratio"):
        if key in model:
            _number(f"model.{key}", model[key], integer=True, minimum=1)
    for key in ("gspn_chunk", "gspn_gate_groups"):
        if key in model:
            _number(f"model.{key}", model[key], integer=True, minimum=1, optional=True)
    if "gspn_global_layers" in model:
        _number("model.gspn_global_layers", model["gspn_global_layers"], integer=True, minimum=0, optional=True)
    for key in ("learn_sigma", "gspn_dwconv", "gspn_skip", "gspn_output_gate", "use_pos_embed"):
        if key in model and not (model[key] is None and key == "use_pos_embed"):
            _flag(f"model.{key}", model[key])
    if "class_dropout_prob" in model:
        _number("model.class_dropout_prob", model["class_dropout_prob"], minimum=0, below=1)
    if "mlp_ratio" in model:
        _number("model.mlp_ratio", model["mlp_ratio"], above=0)
    hidden, heads = model.get("hidden_size"), model.get("num_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise ConfigError(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")


def validate_config(config: dict) -> None:
    """Check every key of a complete config (types, ranges, choices, the zoo name, divisibility) before
    anything is built; raise a ConfigError naming the key, its value and what would fit."""
    if not isinstance(config["run_dir"], str) or not config["run_dir"].strip():
        raise ConfigError(f"run_dir must be a folder path, got {config['run_dir']!r}")
    _number("seed", config["seed"], integer=True, minimum=0)
    _check_model_section(config["model"])

    data = config["data"]
    _choice("data.kind", data["kind"], DATA_KINDS)
    if data["kind"] == "latents":
        if not isinstance(data["path"], str) or not data["path"]:
            raise ConfigError("data.path must name a latent folder (written by extract_latents.py) for "
                              "data.kind=latents")
        if not Path(data["path"]).is_dir():
            raise ConfigError(f"data.path {data['path']} is not a folder: extract latents into it first "
                              f"(extract_latents.py --out {data['path']})")
    _flag("data.flip", data["flip"])
    _number("data.num_per_class", data["num_per_class"], integer=True, minimum=1)
    _number("data.image_size", data["image_size"], integer=True, minimum=1)
    _number("data.num_workers", data["num_workers"], integer=True, minimum=0)
    if data["kind"] == "shapes":
        patch = int(config["model"].get("patch_size", config["model"]["name"].rsplit("/", 1)[-1]))
        if data["image_size"] % patch:
            raise ConfigError(f"data.image_size={data['image_size']} must be divisible by the patch size {patch} "
                              f"of {config['model']['name']}")

    train = config["train"]
    _number("train.steps", train["steps"], integer=True, minimum=1)
    _number("train.global_batch_size", train["global_batch_size"], integer=True, minimum=1)
    _number("train.grad_accum_steps", train["grad_accum_steps"], integer=True, minimum=1)
    if train["global_batch_size"] % train["grad_accum_steps"]:
        raise ConfigError(f"train.global_batch_size={train['global_batch_size']} must be divisible by "
                          f"train.grad_accum_steps={train['grad_accum_steps']}")
    _number("train.lr", train["lr"], above=0)
    _number("train.weight_decay", train["weight_decay"], minimum=0)
    betas = train["betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas!r}")
    _number("train.warmup_steps", train["warmup_steps"], integer=True, minimum=0)
    _number("train.grad_clip", train["grad_clip"], above=0, optional=True)
    _choice("train.objective", train["objective"], OBJECTIVES)
    _choice("train.flow_timesteps", train["flow_timesteps"], TIMESTEP_SAMPLING)
    _number("train.snr_gamma", train["snr_gamma"], above=0, optional=True)
    _choice("train.mixed_precision", train["mixed_precision"], MIXED_PRECISION)
    for key in ("gradient_checkpointing", "compile", "ema_warmup", "cpu"):
        _flag(f"train.{key}", train[key])
    _number("train.ema_decay", train["ema_decay"], minimum=0, below=1)
    _number("train.time_limit_minutes", train["time_limit_minutes"], above=0, optional=True)

    repa = config["repa"]
    _number("repa.block", repa["block"], integer=True, minimum=1, optional=True)
    if repa["block"] is not None and not (isinstance(repa["encoder"], str) and repa["encoder"]):
        raise ConfigError(f"repa.block={repa['block']} needs repa.encoder (a TorchScript file, torch.hub "
                          f"FOLDER:entry or a DINOv2 name such as dinov2_vitb14), got {repa['encoder']!r}")
    _number("repa.coefficient", repa["coefficient"], minimum=0)
    _number("repa.projector_dim", repa["projector_dim"], integer=True, minimum=1)

    checkpoint = config["checkpoint"]
    _number("checkpoint.every", checkpoint["every"], integer=True, minimum=1)
    _number("checkpoint.keep_last", checkpoint["keep_last"], integer=True, minimum=1)

    logging = config["logging"]
    _number("logging.every", logging["every"], integer=True, minimum=1)
    _flag("logging.tensorboard", logging["tensorboard"])
    _number("logging.sample_every", logging["sample_every"], integer=True, minimum=0)
    classes = logging["sample_classes"]
    if classes is not None and not (isinstance(classes, list) and classes and all(_is_int(c) and c >= 0
                                                                                 for c in classes)):
        raise ConfigError(f"logging.sample_classes must be a list of class ids (integers >= 0) or null, "
                          f"got {classes!r}")
    _number("logging.samples_per_class", logging["samples_per_class"], integer=True, minimum=1)
    _number("logging.sample_steps", logging["sample_steps"], integer=True, minimum=1)
    _number("logging.cfg_scale", logging["cfg_scale"], minimum=0)
    _check_fid_settings(logging, data["kind"])


def _check_fid_settings(logging: dict, data_kind: str) -> None:
    _number("logging.fid_every", logging["fid_every"], integer=True, minimum=0)
    _number("logging.fid_samples", logging["fid_samples"], integer=True, minimum=2)
    _number("logging.fid_batch_size", logging["fid_batch_size"], integer=True, minimum=1)
    if not logging["fid_every"]:
        return
    extractor, reference, weights = logging["fid_extractor"], logging["fid_reference"], logging["fid_weights"]
    if extractor == "shapes-classifier":
        if data_kind != "shapes":
            raise ConfigError("logging.fid_extractor=shapes-classifier is the built-in shapes dataset's; with "
                              f"data.kind={data_kind} use Inception (null) or a TorchScript extractor file")
    elif extractor is not None and not Path(str(extractor)).is_file():
        raise ConfigError(f"logging.fid_extractor {extractor} is not a file (a TorchScript feature extractor), "
                          f"nor shapes-classifier; null is Inception")
    if extractor is not None and weights is not None:
        raise ConfigError("logging.fid_weights are Inception's: unset them with logging.fid_extractor set")
    if reference is None and extractor != "shapes-classifier":
        raise ConfigError("logging.fid_every > 0 needs logging.fid_reference, the data's FID statistics "
                          "(python -m evaluation IMAGES --save-stats REF.npz, with the same extractor)")
    if reference is not None and not Path(str(reference)).is_file():
        raise ConfigError(f"logging.fid_reference {reference} does not exist (python -m evaluation IMAGES "
                          f"--save-stats {reference})")


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
    try:
        check_num_steps(logging["sampler"], logging["sample_steps"])
    except ValueError as err:
        raise ConfigError(f"logging.sample_steps: {err}") from err
    return config


#: Keys a resumed run may change without changing its arithmetic: where it writes, how long it runs,
#: how often it logs and saves, the device and the loader's worker count.
RESUME_SAFE_KEYS = ("run_dir", "train.steps", "train.time_limit_minutes", "train.cpu", "train.compile",
                    "data.num_workers", "checkpoint.", "logging.")


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, given: dict) -> dict[str, tuple]:
    """The dotted keys (old value, new value) in which ``given`` differs from ``saved`` (both resolved
    configs), leaving out ``RESUME_SAFE_KEYS``."""
    # A key the saved config lacks (added to DEFAULTS since) counts as its default.
    old, new = {**_flatten(DEFAULTS), **_flatten(saved)}, _flatten(given)
    changed = {}
    for key in sorted(set(old) | set(new)):
        if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            changed[key] = (old.get(key), new.get(key))
    return changed


def read_saved_config(checkpoint: str | os.PathLike) -> dict:
    """The resolved config a checkpoint was written with (its ``config.yaml``)."""
    path = Path(checkpoint) / "config.yaml"
    try:
        saved = _yaml(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is missing or not YAML ({exc}); it records the config the checkpoint was "
                          f"trained with") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config mapping")
    return saved


def dump_config(config: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
