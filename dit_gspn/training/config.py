"""Training configuration: OmegaConf structured configs whose dataclasses below are the schema.

    load_config(path, overrides) -> dict      the defaults, the YAML file and ``section.key=value`` overrides merged
    parse_config(dict) -> RunConfig           typed sections, each section's ``validate`` run once
    RunConfig.to_dict()                       the resolved config, as a checkpoint's config.yaml holds it

OmegaConf merges the sources and checks each value's type against the dataclasses (a wrong type or an unknown
key is a ``ConfigError`` naming the full key and the source); each section's ``validate`` checks ranges and
what its keys must satisfy together; ``RunConfig.validate`` what the sections must satisfy together. The two
open sections are checked against the registries: ``model`` holds the zoo name and any constructor argument
of its class (``mixer_kwargs`` against the named mixer's options), ``data`` the dataset kind and that kind's
own options. A new setting is one field in its section's dataclass (and its range in ``validate``).
"""
from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dit_gspn.cli import MAX_SEED
from dit_gspn.errors import UserError
from dit_gspn.diffusion import OBJECTIVES, Objective, check_sampling
from dit_gspn.diffusion.samplers import SamplerSettingError
from dit_gspn.registry import Option, Registry, UnknownNameError, keyword_options
from dit_gspn.sampling.sampler import check_cfg_scale, check_guidance_interval


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key, the file and what was expected."""


def _fail(key: str, want: str, value) -> None:
    raise ConfigError(f"{key} must be {want}, got {value!r}")


def _registered(registry: Registry, name, key: str):
    """``registry[name]``; for a name it does not hold, its own message (the names it holds, the close ones) as a
    ConfigError prefixed with the config key that gave the name."""
    try:
        return registry[name]
    except UnknownNameError as err:
        raise ConfigError(f"{key}: {err}") from None


class Section:
    """A config section: its dataclass fields are the schema; ``validate`` checks ranges and what its keys must
    satisfy together."""

    prefix = ""

    def check_range(self, name: str, *, minimum=None, above=None, below=None) -> None:
        """Field ``name`` (None passes) is >= minimum, > above and < below; NaN fails every range. The error
        says the field's type and range: ``train.steps must be an integer >= 1, got 0``."""
        value = getattr(self, name)
        if value is None:
            return
        if not (value != value or (minimum is not None and value < minimum) or (above is not None and value <= above)
                or (below is not None and value >= below)):
            return
        hint = typing.get_type_hints(type(self)).get(name)
        bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                  f"< {below}" if below is not None else ""]
        want = _describe(hint).replace(" or null", "") + " " + " and ".join(b for b in bounds if b)
        if type(None) in typing.get_args(hint):
            want += " or null"
        _fail(f"{self.prefix}{name}", want, value)


# --- The schema: one dataclass a section --------------------------------------------------------------------

MIXED_PRECISION = ("no", "bf16", "fp16")
#: ``logging.fid_extractor``'s value for the dataset kind's own FID features (``TrainingData.fid_features``).
DATASET_FEATURES = "dataset"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig(Section):
    prefix = "train."

    steps: int = 400_000
    global_batch_size: int = 256  # over all processes and accumulation steps, as DiT counts it
    grad_accum_steps: int = 1
    lr: float = 1e-4  # DiT: AdamW, lr 1e-4, no weight decay, constant
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # a tuple once parsed
    # The learning rate: linear warm-up over warmup_steps, then constant or a cosine from lr down to min_lr at
    # lr_decay_steps (None: train.steps). lr_update_every > 1 holds it for that many steps (the steps of an epoch:
    # a per-epoch schedule), each block at the value of its first step, warm-up counted to the block's end.
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    lr_decay_steps: Optional[int] = None
    lr_update_every: int = 1
    grad_clip: Optional[float] = None  # max gradient norm; None: no clipping (DiT's)
    # "ddpm": DiT's epsilon + learned variance, MSE + VLB; "flow": SiT's linear flow matching (velocity, MSE; the
    # model then has learn_sigma=False); any registered objective. objective_kwargs: its own options (ddpm:
    # snr_gamma, Min-SNR weighting; flow: timestep_sampling uniform | logit_normal, shift: SD3's timestep shift).
    objective: str = "ddpm"
    objective_kwargs: Optional[Dict[str, Any]] = field(default_factory=dict)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)); DiT: off
    cpu: bool = False  # force CPU even where a GPU is present
    time_limit_minutes: Optional[float] = None  # stop early (with a checkpoint and a grid); resume continues

    def validate(self) -> None:
        for key in ("steps", "global_batch_size", "grad_accum_steps", "lr_update_every"):
            self.check_range(key, minimum=1)
        self.check_range("lr", above=0)
        self.check_range("weight_decay", minimum=0)
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            _fail("train.betas", "two numbers in [0, 1), e.g. [0.9, 0.999]", list(self.betas))
        self.betas = tuple(self.betas)
        self.check_range("warmup_steps", minimum=0)
        if self.lr_schedule not in LR_SCHEDULES:
            _fail("train.lr_schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        self.check_range("min_lr", minimum=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must not exceed train.lr={self.lr}")
        self.check_range("lr_decay_steps", minimum=1)
        self._check_schedule()
        self.check_range("grad_clip", above=0)
        if self.mixed_precision == "False":  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISION:
            _fail("train.mixed_precision", f"one of {', '.join(MIXED_PRECISION)}", self.mixed_precision)
        self.check_range("ema_decay", minimum=0, below=1)
        self.check_range("time_limit_minutes", above=0)
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be divisible by "
                              f"train.grad_accum_steps={self.grad_accum_steps}")
        objective = _registered(OBJECTIVES, self.objective, "train.objective")
        self.objective_kwargs = check_options(objective, self.objective_kwargs or {},
                                              "train.objective_kwargs", f"the {self.objective} objective",
                                              complete=True)
        try:
            self.build_objective()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"train.objective_kwargs: {err}") from err

    def _check_schedule(self) -> None:
        """Refuse a schedule setting that would be ignored or would end the cosine at once: ``min_lr`` or
        ``lr_decay_steps`` set (to other than their defaults) with the constant schedule, or a cosine whose
        ``lr_decay_steps`` is not past ``warmup_steps`` (it would drop to ``min_lr`` one step after the warm-up)."""
        if self.lr_schedule == "constant":
            for key in ("min_lr", "lr_decay_steps"):
                value = getattr(self, key)
                if value != getattr(TrainConfig, key):
                    raise ConfigError(f"train.{key}={value} has no effect with train.lr_schedule=constant (it shapes "
                                      f"the cosine): set train.lr_schedule=cosine, or leave train.{key} unset")
        elif self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ConfigError(f"train.lr_decay_steps={self.lr_decay_steps} must be above train.warmup_steps="
                              f"{self.warmup_steps}: the cosine would drop to train.min_lr={self.min_lr} right after "
                              f"the warm-up")

    def build_objective(self) -> Objective:
        """The training objective with its options."""
        return OBJECTIVES[self.objective](**self.objective_kwargs)


@dataclass
class CheckpointConfig(Section):
    prefix = "checkpoint."

    every: int = 50_000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3

    def validate(self) -> None:
        self.check_range("every", minimum=1)
        self.check_range("keep_last", minimum=1)


@dataclass
class LoggingConfig(Section):
    prefix = "logging."

    every: int = 100  # steps between TensorBoard scalars and the bar's loss
    tensorboard: bool = True
    sample_every: int = 0  # steps between labelled sample grids (0: only at the end)
    sample_classes: Optional[List[int]] = None  # class ids in the grid; None: DiT's for 1000 classes, else 10 spread
    samples_per_class: int = 1
    sampler: Optional[str] = None  # None: the objective's default (ddpm: "ddpm", flow: "euler")
    sample_steps: Optional[int] = None  # None: the sampler's default
    cfg_scale: float = 1.0
    guidance_interval: Optional[List[float]] = None  # [low, high]: guide only steps at noise levels in it
    flow_shift: float = 1.0  # flow samplers: SD3's timestep shift of the grid; 1: none
    # FID (and IS) of the EMA's samples while training (dit_gspn/training/fid_monitor.py), with the grid's sampler:
    fid_every: int = 0  # steps between evaluations; 0: off
    fid_samples: int = 1000  # images per evaluation (fixed seed and classes), all processes
    fid_batch_size: int = 64  # images per sampling batch on each process
    fid_reference: Optional[str] = None  # statistics .npz (python -m evaluation X --save-stats)
    # None: Inception; a feature-extractor file (.pt2 or TorchScript); "dataset": the dataset kind's own features
    # (the built-in shapes': a silhouette classifier, not Inception)
    fid_extractor: Optional[str] = None
    fid_weights: Optional[str] = None  # Inception weights (else $DIT_GSPN_INCEPTION_WEIGHTS)

    def validate(self) -> None:
        for key in ("every", "samples_per_class", "fid_batch_size"):
            self.check_range(key, minimum=1)
        for key in ("sample_every", "fid_every"):
            self.check_range(key, minimum=0)
        self.check_range("fid_samples", minimum=2)
        try:
            check_cfg_scale(self.cfg_scale)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"logging.cfg_scale: {err}") from err
        if self.sample_classes is not None and (not self.sample_classes or min(self.sample_classes) < 0):
            _fail("logging.sample_classes", "a list of class ids (integers >= 0) or null", self.sample_classes)
        try:
            interval = check_guidance_interval(self.guidance_interval)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"logging.guidance_interval: {err}") from err
        self.guidance_interval = None if interval is None else list(interval)
        if self.fid_every:
            self._check_fid_files()

    def _check_fid_files(self) -> None:
        """The FID monitor's extractor and reference exist (when it is on)."""
        extractor, reference = self.fid_extractor, self.fid_reference
        if extractor is not None and extractor != DATASET_FEATURES and not Path(extractor).is_file():
            raise ConfigError(f"logging.fid_extractor {extractor} is not a file (a feature extractor), nor "
                              f"{DATASET_FEATURES} (the dataset's own features); null is Inception")
        if extractor is not None and self.fid_weights is not None:
            raise ConfigError("logging.fid_weights are Inception's: unset them with logging.fid_extractor set")
        if reference is None and extractor != DATASET_FEATURES:
            raise ConfigError("logging.fid_every > 0 needs logging.fid_reference, the data's FID statistics "
                              "(python -m evaluation IMAGES --save-stats REF.npz, with the same extractor)")
        if reference is not None and not Path(reference).is_file():
            raise ConfigError(f"logging.fid_reference {reference} does not exist (python -m evaluation IMAGES "
                              f"--save-stats {reference})")


@dataclass
class RepaConfig(Section):
    """``repa``: representation alignment (REPA, Yu et al. 2025; dit_gspn/training/repa.py), off by default."""

    prefix = "repa."

    block: Optional[int] = None  # align this block's output (1-based; REPA: 8 of 28)
    encoder: Optional[str] = None  # a feature-extractor file, torch.hub FOLDER:entry, or dinov2_vitb14
    coefficient: float = 0.5  # weight of the negative cosine similarity (REPA: 0.5)
    projector_dim: int = 2048  # hidden width of the 3-layer SiLU MLP projector (REPA: 2048)

    def validate(self) -> None:
        self.check_range("block", minimum=1)
        self.check_range("coefficient", minimum=0)
        self.check_range("projector_dim", minimum=1)
        if self.block is not None and not self.encoder:
            raise ConfigError(f"repa.block={self.block} needs repa.encoder (a feature-extractor file, torch.hub "
                              f"FOLDER:entry or a DINOv2 name such as dinov2_vitb14), got {self.encoder!r}")


@dataclass
class ModelConfig:
    """``model``: the zoo name and any constructor argument of its class (hidden_size, depth, mixer_kwargs, ...),
    written side by side in the YAML. in_channels, input_size and num_classes default to the data's."""

    name: str = "GSPN-XL/2"
    options: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from dit_gspn.models import MODELS, MIXERS
        from dit_gspn.models.mixer import mixer_options

        entry = _registered(MODELS, self.name, "model.name")
        options = check_options(entry.model_class, self.options, "model", f"{self.name} ({entry.model_class.__name__})")
        mixer = options.get("mixer", entry.preset.get("mixer"))
        if "mixer" in options:
            _registered(MIXERS, mixer, "model.mixer")
        if options.get("mixer_kwargs") is not None and mixer is not None:
            options["mixer_kwargs"] = check_options(None, options["mixer_kwargs"], "model.mixer_kwargs",
                                                    f"the {mixer} mixer", schema=mixer_options(mixer))
        hidden, heads = options.get("hidden_size"), options.get("num_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
            raise ConfigError(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")
        self.options = options

    def to_dict(self) -> dict:
        return {"name": self.name, **copy.deepcopy(self.options)}


@dataclass
class DataConfig:
    """``data``: the dataset kind (``dit_gspn.training.datasets.DATASETS``), the loader's worker count, and the
    kind's own options (its builder's keyword arguments), written side by side in the YAML."""

    kind: str = "latents"
    num_workers: int = 4
    options: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from .datasets import DATASETS, dataset_options

        _registered(DATASETS, self.kind, "data.kind")
        if self.num_workers < 0:
            _fail("data.num_workers", "an integer >= 0", self.num_workers)
        self.options = check_options(None, self.options, "data", f"the {self.kind} dataset",
                                     schema=dataset_options(self.kind), complete=True)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_workers": self.num_workers, **copy.deepcopy(self.options)}


#: The sections whose keys are fixed by their dataclass (model and data are open: see ModelConfig, DataConfig).
SECTIONS = {"train": TrainConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig, "repa": RepaConfig}


@dataclass
class RunConfig:
    """A whole training run's settings, typed and checked once (``parse_config``); what ``train`` runs."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def validate(self) -> None:
        """Each section's checks, then what the sections must satisfy together; fills in the objective's
        defaults (``model.learn_sigma``, ``logging.sampler`` and ``logging.sample_steps``)."""
        if not self.run_dir.strip():
            _fail("run_dir", "a folder path", self.run_dir)
        if not 0 <= self.seed <= MAX_SEED:
            _fail("seed", "an integer >= 0 and <= 2**63 - 1", self.seed)
        for section in (self.model, self.data, self.train, self.checkpoint, self.logging, self.repa):
            section.validate()
        objective = OBJECTIVES[self.train.objective]
        learn_sigma = self.model.options.get("learn_sigma", objective.learn_sigma)
        if learn_sigma != objective.learn_sigma:
            output = "learns the variance" if objective.learn_sigma else f"predicts a {objective.prediction} only"
            raise ConfigError(f"model.learn_sigma={learn_sigma} does not fit train.objective={objective.name}: "
                              f"{objective.name} {output}; leave model.learn_sigma unset")
        self.model.options["learn_sigma"] = objective.learn_sigma
        logging = self.logging
        if logging.sampler is None:
            logging.sampler = objective.default_sampler
        try:
            _, logging.sample_steps = check_sampling(logging.sampler, objective.name, logging.sample_steps,
                                                     logging.flow_shift)
        except SamplerSettingError as err:
            key = {"sampler": "logging.sampler", "num_steps": "logging.sample_steps",
                   "flow_shift": "logging.flow_shift"}[err.setting]
            raise ConfigError(f"{key}: {err}") from err

    def to_dict(self) -> dict:
        """The config as a mapping of sections (what a checkpoint's config.yaml holds)."""
        out = {"run_dir": self.run_dir, "seed": self.seed, "model": self.model.to_dict(), "data": self.data.to_dict()}
        for name in SECTIONS:
            out[name] = OmegaConf.to_container(OmegaConf.structured(getattr(self, name)))
        return out

    @property
    def objective(self) -> Objective:
        """The training objective, configured from the ``train`` section."""
        return self.train.build_objective()


# --- Options of registered things: the schema read from a signature ----------------------------------------

def check_options(function, options: dict, where: str, owner: str, *, schema: dict[str, Option] | None = None,
                  complete: bool = False) -> dict:
    """``options`` with each value typed as the keyword options of ``function`` (or ``schema``) declare, checked
    by OmegaConf; an unknown key names the ones ``owner`` takes, and one set to null is dropped (how a command
    line unsets another kind's option that a base config holds). ``complete``: fill in the defaults too (and
    require the options without one)."""
    if not isinstance(options, dict):
        _fail(where, "a mapping of options", options)
    schema = keyword_options(function) if schema is None else schema
    options = {key: value for key, value in options.items() if key in schema or value is not None}
    unknown = [key for key in options if key not in schema]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), schema, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown key '{where}.{unknown[0]}'{hint}; {owner} takes: {', '.join(schema) or 'none'} "
                          f"(set it to null to drop it)")
    missing = [o.name for o in schema.values() if o.required and o.name not in options]
    if complete and missing:
        raise ConfigError(f"{where}.{missing[0]} must be set: {owner} has no default for it")
    spec = make_dataclass("Options", [(o.name, _omegaconf_type(o.type), None if o.required else o.default)
                                      for o in schema.values()])
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(spec), options))
    except OmegaConfBaseException as err:
        raise _reworded(err, options, where, hints={o.name: o.type for o in schema.values()}) from None
    return typed if complete else {key: typed[key] for key in options}


def _omegaconf_type(hint):
    """``hint`` as OmegaConf can check it: a union with None as Optional, other unions and containers as Any."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _omegaconf_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if type(None) in args else inner
    return hint if hint in (int, float, bool, str) else Any


def _describe(hint) -> str:
    """What a value of type ``hint`` is, in a user's words."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{_describe(rest[0]) if len(rest) == 1 else 'a value'} or null"
    if typing.get_origin(hint) in (list, List):
        return "a list of integers" if args and args[0] is int else "a list of numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, f"a {hint}")


def _reworded(err: OmegaConfBaseException, source: dict, where: str = "", origin: str = "",
              hints: dict | None = None) -> ConfigError:
    """OmegaConf's error as one ConfigError line naming the full key, the expected type and the given value."""
    key = getattr(err, "full_key", None) or ""
    full = ".".join(part for part in (where, key) if part)
    prefix = f"{origin}: " if origin else ""
    if isinstance(err, ConfigKeyError):
        parent, _, name = full.rpartition(".")
        known = _schema_keys(parent)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return ConfigError(f"{prefix}unknown key {full!r}{hint}")
    value = _lookup(source, key.split(".")) if key else None
    hint = hints.get(key) if hints is not None else _schema_hint(full)
    if isinstance(err, ValidationError) and hint is not None and key:
        return ConfigError(f"{prefix}{full} must be {_describe(hint)}, got {value!r}")
    message = str(err).splitlines()[0]
    return ConfigError(f"{prefix}{full + ': ' if full else ''}{message}")


def _lookup(mapping, parts):
    for part in parts:
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _schema_keys(dotted: str) -> list[str]:
    cls = {"": _RunSchema, **SECTIONS}.get(dotted)
    return [f.name for f in fields(cls)] if cls is not None else []


def _schema_hint(dotted: str):
    section, _, key = dotted.rpartition(".")
    cls = {"": _RunSchema, **SECTIONS}.get(section)
    if cls is None:
        return None
    return typing.get_type_hints(cls).get(key)


# --- Sources: defaults, YAML files, overrides ---------------------------------------------------------------

@dataclass
class _RunSchema:
    """The YAML form of RunConfig: the open sections ``model`` and ``data`` as mappings."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: Dict[str, Any] = field(default_factory=lambda: {"name": ModelConfig.name})
    data: Dict[str, Any] = field(default_factory=lambda: {"kind": DataConfig.kind,
                                                          "num_workers": DataConfig.num_workers})
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)


#: Every key a run can use, with its default (the schema's defaults as a mapping).
DEFAULTS: dict = OmegaConf.to_container(OmegaConf.structured(_RunSchema))

#: Keys of older configs and the keys they are now (see ``upgrade_config``).
LEGACY_TRAIN_KEYS = {"flow_timesteps": ("timestep_sampling", "uniform"), "flow_shift": ("shift", 1.0),
                     "snr_gamma": ("snr_gamma", None)}


def upgrade_config(config: dict) -> dict:
    """``config`` (one source, possibly partial) with the keys of older versions moved where they are now:
    ``model.gspn_*`` into ``model.mixer_kwargs``; ``train.flow_timesteps``, ``flow_shift`` and ``snr_gamma``
    into ``train.objective_kwargs`` (dropped where they hold their old default, which every objective then
    had in its config whether it read it or not); ``logging.fid_extractor: shapes-classifier`` (the built-in
    shapes' features) as ``dataset``."""
    from dit_gspn.models.dit import upgrade_model_config

    config = copy.deepcopy(config)
    if isinstance(config.get("model"), dict):
        config["model"] = upgrade_model_config(config["model"])
    train = config.get("train")
    if isinstance(train, dict) and any(key in train for key in LEGACY_TRAIN_KEYS):
        moved = {}
        for old, (new, default) in LEGACY_TRAIN_KEYS.items():
            if old in train:
                value = train.pop(old)
                if value != default:
                    moved[new] = value
        if moved:
            train["objective_kwargs"] = {**moved, **(train.get("objective_kwargs") or {})}
    logging = config.get("logging")
    if isinstance(logging, dict) and logging.get("fid_extractor") == "shapes-classifier":
        logging["fid_extractor"] = DATASET_FEATURES
    return config


def _merge_source(base, update: dict, origin: str):
    """``base`` (an OmegaConf config) with ``update`` merged over it; an OmegaConf error as a ConfigError."""
    if not isinstance(update, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(update).__name__}")
    update = upgrade_config(update)
    for name in ("model", "data"):  # the open sections: merged key by key, never replaced as a whole
        if name in update and not isinstance(update[name], dict):
            raise ConfigError(f"{origin}: {name!r} must be a mapping, got {update[name]!r}")
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _reworded(err, update, origin=origin) from None


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping a YAML file holds; a ConfigError naming the file for a missing file, text that is not UTF-8,
    invalid YAML, or a key written twice in one mapping (YAML would keep the last one without a word)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} "
                          + ("is a folder, not a YAML file" if path.is_dir() else "does not exist"))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    try:
        _refuse_duplicate_keys(yaml.compose(text), path)
        loaded = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _refuse_duplicate_keys(node, path: Path, where: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value_node in node.value:
            key = key_node.value
            dotted = f"{where}{key}"
            if key in seen:
                raise ConfigError(f"{path}: {dotted!r} is written twice, on lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}; YAML would keep only the last: merge them")
            seen[key] = key_node.start_mark.line
            _refuse_duplicate_keys(value_node, path, f"{dotted}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, where)


def parse_override(text: str) -> dict:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 3e-4}}``; the value is read as YAML (numbers, null, lists)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=1000")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([text]))
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split()[:8])}); "
                          f"quote it or fix it") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {text!r}: {str(err).splitlines()[0]}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """The defaults, updated by the YAML file at ``path`` (if any), then by each ``key=value`` override, every
    value's type checked; a complete mapping of sections."""
    config = OmegaConf.structured(_RunSchema)
    if path is not None:
        config = _merge_source(config, read_yaml(path), str(path))
    for text in overrides:
        config = _merge_source(config, parse_override(text), f"override {text!r}")
    return OmegaConf.to_container(config)


def parse_config(config: dict | RunConfig) -> RunConfig:
    """``config`` (a possibly partial mapping; unknown keys refused) as a RunConfig: every value typed, each
    section validated, the objective's defaults filled in (``RunConfig.validate``). A ConfigError names the key,
    its value and what would fit."""
    if isinstance(config, RunConfig):
        config = config.to_dict()
    merged = OmegaConf.to_container(_merge_source(OmegaConf.structured(_RunSchema), config, "config"))
    model, data = dict(merged["model"]), dict(merged["data"])
    if "name" not in model:
        model["name"] = ModelConfig.name
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**merged[name])
    run = RunConfig(run_dir=merged["run_dir"] if merged["run_dir"] is not None else "", seed=merged["seed"],
                    model=ModelConfig(model.pop("name"), model),
                    data=DataConfig(data.pop("kind", DataConfig.kind), data.pop("num_workers", DataConfig.num_workers),
                                    data),
                    **sections)
    run.validate()
    return run


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
    configs: ``RunConfig.to_dict()``), leaving out ``RESUME_SAFE_KEYS``."""
    old, new = _flatten(saved), _flatten(given)
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
    """The config a checkpoint was written with (its ``config.yaml``), resolved as this version resolves it: the
    keys of older versions upgraded, and the data options its kind does not take dropped (older versions wrote
    every kind's options)."""
    from .datasets import DATASETS, dataset_options

    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; it records the config the checkpoint was trained with")
    saved = upgrade_config(read_yaml(path))
    missing = [name for name in ("model", "data", "train") if name not in saved]
    if missing:  # every version wrote these sections whole: one missing is damage, not a change
        raise ConfigError(f"{path} lacks the section(s) {', '.join(missing)} (damaged or truncated?); it records "
                          f"the config the checkpoint was trained with: restore it, or resume with --config and "
                          f"--allow-config-change")
    data = saved.get("data")
    if isinstance(data, dict) and data.get("kind") in DATASETS:
        accepted = set(dataset_options(data["kind"])) | {"kind", "num_workers"}
        saved["data"] = {key: value for key, value in data.items() if key in accepted}
    return parse_config(saved).to_dict()
