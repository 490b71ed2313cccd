"""The samplers by name: the objective whose models each one draws, its default step count, and the one check
of a sampler's settings that the command line, the config and the schedule all call.

A sampler is one registration::

    register_sampler(SamplerSpec("my-sampler", objective="flow", build=my_schedule, default_steps=50))

where ``build(num_steps, clip_denoised=..., learn_sigma=..., flow_shift=...)`` returns a ready-to-step
``SamplingSchedule`` (``schedule.py`` builds the six built-in ones so). ``sample.py --sampler``, the config's
``logging.sampler`` and ``dit_gspn.sampling.sample`` then accept it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dit_gspn.registry import Registry, UnknownNameError

from .flow import check_shift


class SamplerSettingError(ValueError):
    """A sampling setting that does not fit; ``setting`` names it ("sampler", "num_steps" or "flow_shift"), so
    that each caller can name its own key or flag for it."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its name, the objective (name) whose models it draws, ``build``, its default step count, and
    its rules: whether it draws fresh noise at every step (it then takes the sampling generator), whether SD3's
    timestep shift applies to its grid, the fewest steps it takes, and ``check_steps`` (a further rule on the
    step count, e.g. ADM's respacing counts; raises a ValueError)."""

    name: str
    objective: str  # the objective whose models it draws, and every objective drawn as that one (draws_as)
    build: Callable
    default_steps: int
    stochastic: bool = False
    shifts_timesteps: bool = False
    min_steps: int = 1
    check_steps: Callable[[int], object] | None = None

    def check(self, num_steps: int | None = None, flow_shift: float = 1.0) -> int:
        """The step count to run (``default_steps`` for None), after checking it and ``flow_shift`` against this
        sampler's rules; a ``SamplerSettingError`` saying what fits otherwise."""
        num_steps = self.default_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < self.min_steps:
            raise SamplerSettingError("num_steps", f"the {self.name} sampler takes an integer number of steps >= "
                                                   f"{self.min_steps}, got {num_steps!r}")
        if self.check_steps is not None:
            try:
                self.check_steps(num_steps)
            except ValueError as err:
                raise SamplerSettingError("num_steps", str(err)) from None
        try:
            shift = check_shift(flow_shift)
        except (TypeError, ValueError) as err:
            raise SamplerSettingError("flow_shift", str(err)) from None
        if shift != 1.0 and not self.shifts_timesteps:
            shifted = ", ".join(name for name, spec in SAMPLERS.items() if spec.shifts_timesteps)
            raise SamplerSettingError("flow_shift", f"the timestep shift applies to the samplers {shifted}, not to "
                                                    f"{self.name!r}; leave it at 1")
        return num_steps


#: Every sampler by name (``sample.py --sampler``, ``logging.sampler``).
SAMPLERS: Registry[SamplerSpec] = Registry("sampler")


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Register ``spec`` under its name; returns it."""
    return SAMPLERS.register(spec.name, spec)


def _drawn_as(objective: str) -> str:
    """The objective whose samplers draw models trained with ``objective`` (``Objective.draws_as``)."""
    from .objective import OBJECTIVES  # the objectives sit above the samplers

    return OBJECTIVES[objective].drawn_as() if objective in OBJECTIVES else objective


def samplers_of(objective: str) -> tuple[str, ...]:
    """The samplers that draw from models trained with the objective named ``objective``."""
    drawn_as = _drawn_as(objective)
    return tuple(name for name, spec in SAMPLERS.items() if spec.objective == drawn_as)


def check_sampling(sampler: str, objective: str, num_steps: int | None = None,
                   flow_shift: float = 1.0) -> tuple[SamplerSpec, int]:
    """(the sampler's spec, the step count to run) after checking every setting of a sampling run: the sampler
    exists, draws from models trained with ``objective``, and takes ``num_steps`` (None: its default) and
    ``flow_shift``. A ``SamplerSettingError`` naming the setting says what would fit."""
    try:
        spec = SAMPLERS[sampler]
    except UnknownNameError as err:
        raise SamplerSettingError("sampler", str(err)) from None
    if spec.objective != _drawn_as(objective):
        raise SamplerSettingError("sampler", f"sampler {sampler!r} does not fit a model trained with the "
                                             f"{objective!r} objective; use one of {', '.join(samplers_of(objective))}")
    return spec, spec.check(num_steps, flow_shift)
