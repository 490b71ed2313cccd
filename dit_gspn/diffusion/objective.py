"""The training objectives as objects: what the model predicts, whether it learns a variance, how training
draws timesteps, the loss, the model's timestep and the samplers that fit it; one registry by name.

A run names its objective (``train.objective``, a checkpoint's ``SamplingInfo.objective``); everything that
depends on it asks the object instead of comparing the name:

    objective = get_objective("flow", timestep_sampling="logit_normal", shift=3.0)
    objective.learn_sigma, objective.default_sampler      # False, "euler"
    t = objective.sample_timesteps(batch, generator)     # what the loss takes as t
    losses = objective.losses(model, x, t, dict(y=y), noise)["loss"]

``ddpm`` is DiT's Gaussian diffusion (epsilon and a learned variance, MSE + VLB, integer timesteps
0..999, ADM's samplers); ``flow`` is SiT's linear flow matching (a velocity, MSE, fractional timesteps
s * 1000, the ODE samplers and SiT's SDE).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, ClassVar

import torch

from dit_gspn.cli import UserError

from .flow import TIMESTEP_SAMPLING, FlowMatching
from .gaussian import GaussianDiffusion
from .schedule import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, SAMPLERS, SamplingSchedule, check_num_steps, make_schedule


class UnknownObjectiveError(UserError, ValueError):
    """A training objective name that is not in the registry; the message lists the ones that are."""


class Objective:
    """What one training objective means to the model, the trainer and the samplers (subclasses fill it in).

    Class attributes: ``name`` (the registry key), ``kind`` (its words for a model trained so), ``prediction``
    (what the model outputs), ``learn_sigma`` (whether the model also outputs a variance: 2C channels instead
    of C), ``samplers`` (those that draw from a model trained this way, the default first; ``schedule`` builds
    one), ``timestep_dtype`` (the model's timestep: integers for diffusion, fractions for flow matching),
    ``shifts_timesteps`` (SD3's timestep shift applies), ``weights_by_snr`` (Min-SNR weighting applies) and
    ``train_settings`` (constructor argument -> the ``train.*`` config key it is read from).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    prediction: ClassVar[str]
    learn_sigma: ClassVar[bool]
    samplers: ClassVar[tuple[str, ...]]
    timestep_dtype: ClassVar[torch.dtype]
    shifts_timesteps: ClassVar[bool] = False
    weights_by_snr: ClassVar[bool] = False
    train_settings: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_train_config(cls, train) -> "Objective":
        """This objective configured from a run's ``train`` section (a mapping or an object with those attributes)."""
        get = train.__getitem__ if isinstance(train, dict) else partial(getattr, train)
        return cls(**{arg: get(key) for arg, key in cls.train_settings.items()})

    @property
    def default_sampler(self) -> str:
        """The sampler a model trained with this objective is drawn with unless one is named."""
        return self.samplers[0]

    @classmethod
    def check_sampler(cls, sampler: str, num_steps: int | None = None) -> None:
        """Raise a ValueError unless ``sampler`` draws from models trained with this objective (in ``num_steps``)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if sampler not in cls.samplers:
            raise ValueError(f"sampler {sampler!r} does not fit a model trained with the {cls.name!r} objective; "
                             f"use one of {cls.samplers}")
        if num_steps is not None:
            check_num_steps(sampler, num_steps)

    @classmethod
    def schedule(cls, sampler: str, num_steps: int | None = None, *, clip_denoised: bool = False,
                 learn_sigma: bool | None = None, flow_shift: float = 1.0) -> SamplingSchedule:
        """The ready-to-step schedule of one of this objective's samplers (``make_schedule``); ``learn_sigma``
        (whether the model outputs a variance) defaults to the objective's."""
        cls.check_sampler(sampler)
        return make_schedule(sampler, num_steps, clip_denoised, cls.learn_sigma if learn_sigma is None else learn_sigma,
                             flow_shift)

    @classmethod
    def model_timesteps(cls, timestep, rows: int, device) -> torch.Tensor:
        """(rows,) copies of a sampler step's model timestep, in the dtype the model was trained with."""
        value = float(timestep) if cls.timestep_dtype.is_floating_point else int(timestep)
        return torch.full((rows,), value, dtype=cls.timestep_dtype, device=device)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) training timesteps on the CPU, drawn from ``generator``: what ``losses`` takes as ``t``."""
        raise NotImplementedError

    def losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
               noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses, each of shape (B,), under key ``"loss"`` (and the objective's parts)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DiffusionObjective(Objective):
    """DiT's: epsilon and a learned variance under MSE + VLB, timesteps uniform in 0..999 (``GaussianDiffusion``);
    ``snr_gamma`` weights the epsilon MSE by Min-SNR (None: DiT's plain MSE)."""

    name = "ddpm"
    kind = "Gaussian-diffusion"
    prediction = "epsilon"
    learn_sigma = True
    samplers = DIFFUSION_SAMPLERS
    timestep_dtype = torch.long
    weights_by_snr = True
    train_settings = {"snr_gamma": "snr_gamma"}

    def __init__(self, snr_gamma: float | None = None):
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.process = GaussianDiffusion()

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.process.sample_timesteps(batch, "cpu", generator)

    def losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return self.process.training_losses(model, x_start, t, model_kwargs, noise, snr_gamma=self.snr_gamma)

    def __repr__(self) -> str:
        return f"DiffusionObjective(snr_gamma={self.snr_gamma})"


class FlowObjective(Objective):
    """SiT's linear flow matching: a velocity under MSE, noise levels drawn as ``timestep_sampling`` says and
    moved by SD3's ``shift`` (``FlowMatching``); the model's timestep is the noise level x 1000."""

    name = "flow"
    kind = "flow-matching"
    prediction = "velocity"
    learn_sigma = False
    samplers = FLOW_SAMPLERS
    timestep_dtype = torch.float32
    shifts_timesteps = True
    train_settings = {"timestep_sampling": "flow_timesteps", "shift": "flow_shift"}

    def __init__(self, timestep_sampling: str = "uniform", shift: float = 1.0):
        self.process = FlowMatching(timestep_sampling=timestep_sampling, shift=shift)

    @property
    def shift(self) -> float:
        return self.process.shift

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.process.sample_timesteps(batch, "cpu", generator)

    def losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return self.process.training_losses(model, x_start, t, model_kwargs, noise)

    def __repr__(self) -> str:
        return f"FlowObjective(timestep_sampling={self.process.timestep_sampling!r}, shift={self.shift})"


#: Every objective by name (``train.objective``, ``SamplingInfo.objective``).
REGISTRY: dict[str, type[Objective]] = {cls.name: cls for cls in (DiffusionObjective, FlowObjective)}
OBJECTIVES = tuple(REGISTRY)
#: The samplers of each objective, its default first.
OBJECTIVE_SAMPLERS = {name: cls.samplers for name, cls in REGISTRY.items()}


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``; an ``UnknownObjectiveError`` naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownObjectiveError(f"unknown training objective {name!r}; choose one of "
                                    f"{', '.join(OBJECTIVES)}") from None


def get_objective(name: str, **settings) -> Objective:
    """The objective ``name`` configured with ``settings`` (``ddpm``: snr_gamma; ``flow``: timestep_sampling,
    shift); without settings, its defaults (what a sampler needs to know)."""
    return objective_class(name)(**settings)


def objective_of_sampler(sampler: str) -> type[Objective]:
    """The objective whose models ``sampler`` draws from; a ValueError for an unknown sampler."""
    for cls in REGISTRY.values():
        if sampler in cls.samplers:
            return cls
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def default_sampler(objective: str) -> str:
    """The sampler a model trained with the objective named ``objective`` is drawn with unless one is named."""
    return objective_class(objective).samplers[0]


def check_sampler(sampler: str, objective: str, num_steps: int | None = None) -> None:
    """Raise a ValueError unless ``sampler`` draws from models trained with the objective named ``objective``."""
    objective_class(objective).check_sampler(sampler, num_steps)


__all__ = ["OBJECTIVES", "OBJECTIVE_SAMPLERS", "REGISTRY", "TIMESTEP_SAMPLING", "DiffusionObjective",
           "FlowObjective", "Objective", "UnknownObjectiveError", "check_sampler", "default_sampler",
           "get_objective", "objective_class", "objective_of_sampler"]
