"""Training configuration: one typed schema (``RunConfig``), filled from YAML files and ``section.key=value``
overrides, and checked once.

    load_config(path, overrides) -> dict       the file and the overrides merged over DEFAULTS
    parse_config(dict) -> RunConfig            every key checked (type, range, choice), the objective resolved
    validate_config(dict) -> RunConfig         parse_config and what the run needs beyond its keys (the data)
    RunConfig.to_dict()                        the resolved config, as a checkpoint's config.yaml holds it

Every key a run can use is a field of a section dataclass below, whose declaration (``integer``, ``number``,
``flag``, ``choice``, ``custom``) is its check; ``DEFAULTS`` is the schema's defaults as a mapping. An unknown
key (a typo) is an error that names it and the keys it could have meant, never a silently ignored setting.
A new setting is one field in its section (with its check); a new section, one ``_Section`` dataclass and
its line in ``RunConfig`` and ``parse_config``.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dit_gspn.cli import UserError
from dit_gspn.diffusion import OBJECTIVES, Objective, check_num_steps, default_num_steps, objective_class
from dit_gspn.diffusion.flow import TIMESTEP_SAMPLING
from dit_gspn.diffusion.objective import REGISTRY, UnknownObjectiveError
from dit_gspn.sampling.sampler import check_guidance_interval


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; researchers write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key, the file and what was expected."""


# --- What a value may be: each check takes (dotted key, value) and returns the value as the run uses it ---

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _number(key: str, value, *, integer: bool = False, minimum=None, below=None, optional: bool = False,
            above=None) -> None:
    """Check that ``value`` (config key ``key``) is a number in range, or raise a ConfigError saying what fits."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    ok_type = _is_int(value) if integer else _is_number(value)
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


def integer(default, *, minimum=None, optional: bool = False):
    """A field holding an integer (>= ``minimum``; or None if ``optional``)."""
    def check(key, value):
        _number(key, value, integer=True, minimum=minimum, optional=optional)
        return value
    return field(default=default, metadata={"check": check})


def number(default, *, minimum=None, above=None, below=None, optional: bool = False):
    """A field holding a float (an integer in the YAML is read as one), in range; or None if ``optional``."""
    def check(key, value):
        _number(key, value, minimum=minimum, above=above, below=below, optional=optional)
        return None if value is None else float(value)
    return field(default=default, metadata={"check": check})


def flag(default: bool):
    """A field holding true or false."""
    def check(key, value):
        _flag(key, value)
        return value
    return field(default=default, metadata={"check": check})


def choice(default, choices):
    """A field holding one of ``choices``."""
    def check(key, value):
        _choice(key, value, choices)
        return value
    return field(default=default, metadata={"check": check})


def custom(default, check=None):
    """A field whose value ``check(key, value)`` checks and returns (None: taken as it is; checked elsewhere)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _run_dir(key, value):
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a folder path, got {value!r}")
    return value


def _optional_text(key, value):
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string or null, got {value!r}")
    return value


def _betas(key, value):
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)):
        raise ConfigError(f"{key} must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {value!r}")
    return tuple(float(b) for b in value)


def _class_ids(key, value):
    if value is not None and not (isinstance(value, list) and value and all(_is_int(c) and c >= 0 for c in value)):
        raise ConfigError(f"{key} must be a list of class ids (integers >= 0) or null, got {value!r}")
    return value


def _guidance_interval(key, value):
    try:
        interval = check_guidance_interval(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from err
    return None if interval is None else list(interval)


class _Section:
    """A config section: a dataclass whose fields carry their check; ``parse`` builds it from a mapping."""

    @classmethod
    def parse(cls, values: dict, where: str):
        """The section from ``values`` (complete: every key present), each value checked and normalised."""
        kwargs = {}
        for f in fields(cls):
            check = f.metadata.get("check")
            kwargs[f.name] = values[f.name] if check is None else check(f"{where}{f.name}", values[f.name])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value):
    """``value`` as YAML writes it: tuples as lists, sections as mappings."""
    if isinstance(value, (_Section, ModelConfig)):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_model_section(model: dict) -> None:
    import inspect

    from dit_gspn.models import MODELS, DiT

    name = model.get("name")
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), MODELS, n=3)
        raise ConfigError(f"model.name {name!r} is not a zoo model"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; known: {', '.join(MODELS)}")
    accepted = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]
    for key, value in model.items():
        if key == "name":
            continue
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3)
            raise ConfigError(f"unknown key 'model.{key}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + f"; DiT takes: {', '.join(accepted)}")
    for key in ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "num_classes"):
        if key in model:
            _number(f"model.{key}", model[key], integer=True, minimum=1)
    for key in ("learn_sigma", "use_pos_embed"):
        if key in model and not (model[key] is None and key == "use_pos_embed"):
            _flag(f"model.{key}", model[key])
    if "class_dropout_prob" in model:
        _number("model.class_dropout_prob", model["class_dropout_prob"], minimum=0, below=1)
    if "mlp_ratio" in model:
        _number("model.mlp_ratio", model["mlp_ratio"], above=0)
    hidden, heads = model.get("hidden_size"), model.get("num_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise ConfigError(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")


# --- The schema ----------------------------------------------------------------------------------------------

MIXED_PRECISION = ("no", "bf16", "fp16")
DATA_KINDS = ("latents", "shapes")


@dataclass
class ModelConfig:
    """``model``: the zoo name, and any further DiT constructor argument (hidden_size, depth, gspn_chunk, ...).
    input_size, in_channels and num_classes default to what the data says; learn_sigma to the objective's."""

    name: str = "GSPN-XL/2"
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, values: dict) -> "ModelConfig":
        """The section from ``values``: the zoo name and each DiT argument checked."""
        from dit_gspn.models.dit import upgrade_model_config

        values = upgrade_model_config(values)
        _check_model_section(values)
        return cls(values["name"], {k: v for k, v in values.items() if k != "name"})

    def to_dict(self) -> dict:
        return {"name": self.name, **_plain(self.options)}

    @property
    def patch_size(self) -> int:
        return int(self.options.get("patch_size", self.name.rsplit("/", 1)[-1]))


@dataclass
class DataConfig(_Section):
    kind: str = choice("latents", DATA_KINDS)       # a folder written by extract_latents.py, or the built-in shapes
    path: str | None = custom(None, _optional_text)  # the latent folder
    flip: bool = flag(True)                          # use the flipped copies too (latents: needs them extracted)
    num_per_class: int = integer(500, minimum=1)     # shapes: images per class
    image_size: int = integer(32, minimum=1)         # shapes: pixels
    num_workers: int = integer(4, minimum=0)


@dataclass
class TrainConfig(_Section):
    steps: int = integer(400_000, minimum=1)
    global_batch_size: int = integer(256, minimum=1)  # over all processes and accumulation steps, as DiT counts it
    grad_accum_steps: int = integer(1, minimum=1)
    lr: float = number(1e-4, above=0)                 # DiT: AdamW, lr 1e-4, no weight decay, constant
    weight_decay: float = number(0.0, minimum=0)
    betas: tuple = custom((0.9, 0.999), _betas)
    warmup_steps: int = integer(0, minimum=0)
    grad_clip: float | None = number(None, above=0, optional=True)  # max gradient norm; None: no clipping (DiT's)
    # "ddpm": DiT's epsilon + learned variance, MSE + VLB; "flow": SiT's linear flow matching (velocity, MSE;
    # the model then has learn_sigma=False). The objective object (dit_gspn.diffusion.objective) says the rest.
    objective: str = custom("ddpm")
    flow_timesteps: str = choice("uniform", TIMESTEP_SAMPLING)  # flow: how noise levels are drawn (logit_normal: SD3)
    flow_shift: float = number(1.0, above=0)          # flow: SD3's timestep shift, s' = k s / (1 + (k-1) s); 1: none
    snr_gamma: float | None = number(None, above=0, optional=True)  # ddpm: Min-SNR weighting (e.g. 5.0); None: DiT's
    mixed_precision: str = choice("no", MIXED_PRECISION)
    gradient_checkpointing: bool = flag(False)
    compile: bool = flag(False)                       # torch.compile the model
    ema_decay: float = number(0.9999, minimum=0, below=1)
    ema_warmup: bool = flag(False)                    # decay min(ema_decay, (1 + step) / (10 + step)); DiT: off
    cpu: bool = flag(False)                           # force CPU even where a GPU is present
    # stop early (with a checkpoint and a grid) after this long; resume continues
    time_limit_minutes: float | None = number(None, above=0, optional=True)

    @property
    def objective_class(self) -> type[Objective]:
        """The objective ``objective`` names (an UnknownObjectiveError naming the choices otherwise)."""
        return objective_class(self.objective)


@dataclass
class CheckpointConfig(_Section):
    every: int = integer(50_000, minimum=1)           # optimizer steps between checkpoints (and one at the end)
    keep_last: int = integer(3, minimum=1)


@dataclass
class LoggingConfig(_Section):
    every: int = integer(100, minimum=1)              # steps between TensorBoard scalars and the bar's loss
    tensorboard: bool = flag(True)
    sample_every: int = integer(0, minimum=0)         # steps between labelled sample grids (0: only at the end)
    # class ids in the grid; None: DiT's for 1000 classes, else up to 10 spread
    sample_classes: list | None = custom(None, _class_ids)
    samples_per_class: int = integer(1, minimum=1)
    sampler: str | None = custom(None)                # None: the objective's default (ddpm: "ddpm", flow: "euler")
    sample_steps: int | None = integer(None, minimum=1, optional=True)  # None: the sampler's default
    cfg_scale: float = number(1.0, minimum=0)
    # [low, high]: guide only steps at noise levels (timestep / 1000) in it
    guidance_interval: list | None = custom(None, _guidance_interval)
    flow_shift: float = number(1.0, above=0)          # flow samplers: SD3's timestep shift of the grid; 1: none
    # FID (and IS) of the EMA's samples while training (dit_gspn/training/fid_monitor.py), with the grid's sampler:
    fid_every: int = integer(0, minimum=0)            # steps between evaluations; 0: off
    fid_samples: int = integer(1000, minimum=2)       # images per evaluation (fixed seed and classes), all processes
    fid_batch_size: int = integer(64, minimum=1)      # images per sampling batch on each process
    fid_reference: str | None = custom(None, _optional_text)  # statistics .npz (python -m evaluation X --save-stats)
    # None: Inception; a TorchScript extractor file; "shapes-classifier" (the built-in data's, not Inception)
    fid_extractor: str | None = custom(None, _optional_text)
    fid_weights: str | None = custom(None, _optional_text)  # Inception weights (else $DIT_GSPN_INCEPTION_WEIGHTS)


@dataclass
class RepaConfig(_Section):
    """``repa``: representation alignment (REPA, Yu et al. 2025; dit_gspn/training/repa.py), off by default."""

    block: int | None = integer(None, minimum=1, optional=True)  # align this block's output (1-based; REPA: 8 of 28)
    encoder: str | None = custom(None, _optional_text)  # TorchScript file, torch.hub FOLDER:entry, or dinov2_vitb14
    coefficient: float = number(0.5, minimum=0)       # weight of the negative cosine similarity (REPA: 0.5)
    projector_dim: int = integer(2048, minimum=1)     # hidden width of the 3-layer SiLU MLP projector (REPA: 2048)


@dataclass
class RunConfig:
    """A whole training run's settings, each checked once (``parse_config``); what ``train`` runs."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def to_dict(self) -> dict:
        """The config as a mapping of sections (what a checkpoint's config.yaml holds)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def objective(self) -> Objective:
        """The training objective, configured from the ``train`` section."""
        return self.train.objective_class.from_train_config(self.train)


#: Every key a run can use, with its default (the schema's defaults as a mapping).
DEFAULTS: dict = RunConfig().to_dict()


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


def parse_config(config: dict | RunConfig) -> RunConfig:
    """``config`` (a possibly partial mapping; unknown keys refused) as a RunConfig: every key checked (type,
    range, choice, the zoo name, what one section's keys must satisfy together) and the objective resolved:
    its settings checked against it, ``model.learn_sigma`` set to its own, ``logging.sampler`` and
    ``logging.sample_steps`` filled in with its default sampler and that sampler's step count when None.
    Raises a ConfigError naming the key, its value and what would fit."""
    if isinstance(config, RunConfig):
        config = config.to_dict()
    config = complete_config(config)
    run_dir = _run_dir("run_dir", config["run_dir"])
    _number("seed", config["seed"], integer=True, minimum=0)
    run = RunConfig(run_dir=run_dir, seed=config["seed"],
                    model=ModelConfig.parse(config["model"]),
                    data=DataConfig.parse(config["data"], "data."),
                    train=TrainConfig.parse(config["train"], "train."),
                    checkpoint=CheckpointConfig.parse(config["checkpoint"], "checkpoint."),
                    logging=LoggingConfig.parse(config["logging"], "logging."),
                    repa=RepaConfig.parse(config["repa"], "repa."))
    if run.repa.block is not None and not run.repa.encoder:
        raise ConfigError(f"repa.block={run.repa.block} needs repa.encoder (a TorchScript file, torch.hub "
                          f"FOLDER:entry or a DINOv2 name such as dinov2_vitb14), got {run.repa.encoder!r}")
    if run.train.global_batch_size % run.train.grad_accum_steps:
        raise ConfigError(f"train.global_batch_size={run.train.global_batch_size} must be divisible by "
                          f"train.grad_accum_steps={run.train.grad_accum_steps}")
    _resolve_objective(run)
    return run


def validate_config(config: dict | RunConfig) -> RunConfig:
    """``parse_config``, and what the run needs beyond its keys: the latent folder exists, the shapes fit the
    model's patches. The one check of a config before anything is built."""
    run = parse_config(config)
    data = run.data
    if data.kind == "latents":
        if not data.path:
            raise ConfigError("data.path must name a latent folder (written by extract_latents.py) for "
                              "data.kind=latents")
        if not Path(data.path).is_dir():
            raise ConfigError(f"data.path {data.path} is not a folder: extract latents into it first "
                              f"(extract_latents.py --out {data.path})")
    if data.kind == "shapes" and data.image_size % run.model.patch_size:
        raise ConfigError(f"data.image_size={data.image_size} must be divisible by the patch size "
                          f"{run.model.patch_size} of {run.model.name}")
    _check_fid_files(run.logging, data.kind)
    return run


def _check_fid_files(logging: LoggingConfig, data_kind: str) -> None:
    """The FID monitor's extractor and reference exist and fit the data (when it is on)."""
    if not logging.fid_every:
        return
    extractor, reference = logging.fid_extractor, logging.fid_reference
    if extractor == "shapes-classifier":
        if data_kind != "shapes":
            raise ConfigError("logging.fid_extractor=shapes-classifier is the built-in shapes dataset's; with "
                              f"data.kind={data_kind} use Inception (null) or a TorchScript extractor file")
    elif extractor is not None and not Path(extractor).is_file():
        raise ConfigError(f"logging.fid_extractor {extractor} is not a file (a TorchScript feature extractor), "
                          f"nor shapes-classifier; null is Inception")
    if extractor is not None and logging.fid_weights is not None:
        raise ConfigError("logging.fid_weights are Inception's: unset them with logging.fid_extractor set")
    if reference is None and extractor != "shapes-classifier":
        raise ConfigError("logging.fid_every > 0 needs logging.fid_reference, the data's FID statistics "
                          "(python -m evaluation IMAGES --save-stats REF.npz, with the same extractor)")
    if reference is not None and not Path(reference).is_file():
        raise ConfigError(f"logging.fid_reference {reference} does not exist (python -m evaluation IMAGES "
                          f"--save-stats {reference})")


def _resolve_objective(run: RunConfig) -> None:
    """Check the settings that depend on the objective and fill in its defaults (see ``parse_config``)."""
    train, logging, model = run.train, run.logging, run.model
    try:
        objective = train.objective_class
    except UnknownObjectiveError:
        raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {train.objective!r}") from None
    name = objective.name
    if train.snr_gamma is not None and not objective.weights_by_snr:
        raise ConfigError(f"train.snr_gamma (Min-SNR) weights the epsilon MSE of train.objective="
                          f"{' or '.join(n for n, c in REGISTRY.items() if c.weights_by_snr)}; unset it for "
                          f"train.objective={name}")
    if not objective.shifts_timesteps:
        shifted = " or ".join(n for n, c in REGISTRY.items() if c.shifts_timesteps)
        for key, shift in (("train.flow_shift", train.flow_shift), ("logging.flow_shift", logging.flow_shift)):
            if shift != 1:
                raise ConfigError(f"{key} must be a number > 0 for train.objective={shifted} and 1 (no shift) "
                                  f"otherwise, got {shift!r}")
    learn_sigma = model.options.get("learn_sigma", objective.learn_sigma)
    if learn_sigma != objective.learn_sigma:
        output = "learns the variance" if objective.learn_sigma else f"predicts a {objective.prediction} only"
        raise ConfigError(f"model.learn_sigma={learn_sigma} does not fit train.objective={name}: {name} {output}; "
                          f"leave model.learn_sigma unset")
    model.options["learn_sigma"] = objective.learn_sigma
    if logging.sampler is None:
        logging.sampler = objective.samplers[0]
    try:
        objective.check_sampler(logging.sampler)
    except ValueError as err:
        raise ConfigError(f"logging.sampler: {err}") from err
    if logging.sample_steps is None:
        logging.sample_steps = default_num_steps(logging.sampler)
    try:
        check_num_steps(logging.sampler, logging.sample_steps)
    except ValueError as err:
        raise ConfigError(f"logging.sample_steps: {err}") from err


def resolve_objective(config: dict) -> dict:
    """``parse_config(config)`` as a mapping: the complete config, checked, with its objective's defaults
    filled in (what a checkpoint's config.yaml holds)."""
    return parse_config(config).to_dict()


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
