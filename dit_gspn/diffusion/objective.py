"""The training objectives as objects: what the model predicts, whether it learns a variance, how training
draws timesteps, the loss, the model's timestep and the samplers that fit it; one registry by name.

A run names its objective (``train.objective``, its options in ``train.objective_kwargs``, a checkpoint's
``SamplingInfo.objective``); everything that depends on it asks the object instead of comparing the name:

    objective = get_objective("flow", timestep_sampling="logit_normal", shift=3.0)
    objective.learn_sigma, objective.default_sampler      # False, "euler"
    t = objective.sample_timesteps(batch, generator)     # what the loss takes as t
    losses = objective.losses(model, x, t, dict(y=y), noise)["loss"]

``ddpm`` is DiT's Gaussian diffusion (epsilon and a learned variance, MSE + VLB, integer timesteps
0..999, ADM's samplers); ``flow`` is SiT's linear flow matching (a velocity, MSE, fractional timesteps
s * 1000, the ODE samplers and SiT's SDE).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch

from dit_gspn.registry import Registry

from .flow import TIMESTEP_SAMPLING, FlowMatching
from .gaussian import GaussianDiffusion
from .samplers import SAMPLERS, samplers_of
from .schedule import SamplingSchedule, make_schedule


class Objective:
    """What one training objective means to the model, the trainer and the samplers (subclasses fill it in).

    Class attributes: ``name`` (the registry key), ``kind`` (its words for a model trained so), ``prediction``
    (what the model outputs), ``learn_sigma`` (whether the model also outputs a variance: 2C channels instead
    of C), ``default_sampler`` (the registered sampler a model trained this way is drawn with unless one is
    named; ``samplers()`` lists all that fit), ``draws_as`` (the objective whose samplers draw its models: a
    variant that trains another way towards what that one's models predict shares its samplers; None: its own
    name, and subclasses of the built-ins inherit theirs) and ``timestep_dtype`` (the model's timestep: integers for
    diffusion, fractions for flow matching). The constructor's keyword arguments are the objective's options
    (``train.objective_kwargs``).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    prediction: ClassVar[str]
    learn_sigma: ClassVar[bool]
    default_sampler: ClassVar[str]
    draws_as: ClassVar[str | None] = None
    timestep_dtype: ClassVar[torch.dtype]

    @classmethod
    def drawn_as(cls) -> str:
        """The objective (name) whose registered samplers draw models trained with this one."""
        return cls.draws_as or cls.name

    @classmethod
    def samplers(cls) -> tuple[str, ...]:
        """The registered samplers that draw from models trained with this objective."""
        return samplers_of(cls.name)

    @classmethod
    def schedule(cls, sampler: str, num_steps: int | None = None, *, clip_denoised: bool = False,
                 learn_sigma: bool | None = None, flow_shift: float = 1.0) -> SamplingSchedule:
        """The ready-to-step schedule of one of this objective's samplers (``make_schedule``, which checks that it
        draws from models trained with this objective); ``learn_sigma`` (whether the model outputs a variance)
        defaults to the objective's."""
        return make_schedule(sampler, num_steps, clip_denoised, cls.learn_sigma if learn_sigma is None else learn_sigma,
                             flow_shift, objective=cls.name)

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


#: Every training objective by name (``train.objective``, ``SamplingInfo.objective``).
OBJECTIVES: Registry[type[Objective]] = Registry("training objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: register an :class:`Objective` subclass under its ``name``."""
    return OBJECTIVES.register(cls.name, cls)


@register_objective
class DiffusionObjective(Objective):
    """DiT's: epsilon and a learned variance under MSE + VLB, timesteps uniform in 0..999 (``GaussianDiffusion``);
    ``snr_gamma`` weights the epsilon MSE by Min-SNR (None: DiT's plain MSE)."""

    name = "ddpm"
    kind = "Gaussian-diffusion"
    prediction = "epsilon"
    learn_sigma = True
    default_sampler = "ddpm"
    draws_as = "ddpm"
    timestep_dtype = torch.long

    def __init__(self, snr_gamma: float | None = None):
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.process = GaussianDiffusion()

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.process.sample_timesteps(batch, "cpu", generator)

    def losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return self.process.training_losses(model, x_start, t, model_kwargs, noise, snr_gamma=self.snr_gamma)

    def __repr__(self) -> str:
        return f"DiffusionObjective(snr_gamma={self.snr_gamma})"


@register_objective
class FlowObjective(Objective):
    """SiT's linear flow matching: a velocity under MSE, noise levels drawn as ``timestep_sampling`` says and
    moved by SD3's ``shift`` (``FlowMatching``); the model's timestep is the noise level x 1000."""

    name = "flow"
    kind = "flow-matching"
    prediction = "velocity"
    learn_sigma = False
    default_sampler = "euler"
    draws_as = "flow"
    timestep_dtype = torch.float32

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


def get_objective(name: str, **settings) -> Objective:
    """The objective ``name`` configured with ``settings`` (its options: ``ddpm``: snr_gamma; ``flow``:
    timestep_sampling, shift); without settings, its defaults (what a sampler needs to know)."""
    return OBJECTIVES[name](**settings)


def objective_of_sampler(sampler: str) -> type[Objective]:
    """The objective whose models ``sampler`` draws from (the one it was registered for; variants that draw as it
    share it); an ``UnknownNameError`` for an unknown sampler."""
    return OBJECTIVES[SAMPLERS[sampler].objective]


def default_sampler(objective: str) -> str:
    """The sampler a model trained with the objective named ``objective`` is drawn with unless one is named."""
    return OBJECTIVES[objective].default_sampler


__all__ = ["OBJECTIVES", "TIMESTEP_SAMPLING", "DiffusionObjective", "FlowObjective", "Objective", "default_sampler",
           "get_objective", "objective_of_sampler", "register_objective"]
