"""DiT's noise schedule, and the diffusers schedulers that sample with it (and with flow matching).

The one place the schedule is defined: 1000 steps, linear betas 1e-4 to 0.02 (as DiT and ADM), held in
float64 (``dit_betas``). Here the six built-in samplers are built and registered (``samplers.py``: each
one's objective, default step count and rules): DiT's ``ddpm``, ``ddim`` and ``dpm-solver++`` for its
epsilon + learned variance models, and ``euler``, ``heun`` and SiT's ``sde`` for flow matching's velocity.

``ddpm`` and ``ddim`` equal ADM's ``p_sample_loop`` and ``ddim_sample_loop`` step for step. They are built
as ADM builds its ``SpacedDiffusion``: a diffusers scheduler over only the N kept timesteps
(``respacing``), whose betas are 1 - alpha_bar_k / alpha_bar_{k-1} between kept steps and whose tables
are float64, while the model is called with the original timestep of each kept step
(``SamplingSchedule.model_timesteps``). Diffusers' DDIM steps by ``1000 // N``, which is ADM's stride only
when N divides 1000; over the kept steps its stride is 1 for every N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .flow import HEUN_LAST_LEVEL, ode_noise_levels
from .flow_sde import FlowSDEScheduler
from .respacing import ddim_timesteps, ddpm_timesteps
from .samplers import SAMPLERS, SamplerSpec, check_sampling, register_sampler

#: DiT's training schedule, as diffusers scheduler arguments.
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

def dit_betas(num_train_timesteps: int = DIT_SCHEDULE["num_train_timesteps"],
              beta_start: float = DIT_SCHEDULE["beta_start"], beta_end: float = DIT_SCHEDULE["beta_end"]) -> np.ndarray:
    """DiT's (ADM's linear) betas in float64: ``num_train_timesteps`` values from beta_start to beta_end."""
    if DIT_SCHEDULE["beta_schedule"] != "linear":
        raise NotImplementedError(f"only the linear schedule is implemented, DIT_SCHEDULE says "
                                  f"{DIT_SCHEDULE['beta_schedule']!r}")
    return np.linspace(beta_start, beta_end, int(num_train_timesteps), dtype=np.float64)


@dataclass
class SamplingSchedule:
    """A configured diffusers scheduler, the model timestep each of its steps evaluates, and its step options."""

    scheduler: SchedulerMixin
    model_timesteps: torch.Tensor
    step_kwargs: dict = field(default_factory=dict)
    #: whether ``step`` takes the model's whole output (epsilon and the learned variance) or its first C channels
    takes_variance: bool = False
    #: whether ``step`` draws fresh noise (it then takes the sampling generator)
    stochastic: bool = False

    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(scheduler timestep, model timestep) pairs, first step first."""
        return zip(self.scheduler.timesteps, self.model_timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, **kwargs):
        """``scheduler.step`` with this schedule's options (e.g. DDIM's eps re-derived from a clipped x0)."""
        return self.scheduler.step(model_output, timestep, sample, **self.step_kwargs, **kwargs)


def respaced_scheduler(scheduler_class: type[SchedulerMixin], kept: Sequence[int], **config) -> SchedulerMixin:
    """A diffusers scheduler over the kept training timesteps only (ADM's ``SpacedDiffusion``), float64 tables.

    Its step k goes from kept[k] to kept[k - 1] (to x_0 after kept[0]); its timesteps are 0 .. len(kept) - 1,
    indices into ``kept``.
    """
    alphas_cumprod = np.cumprod(1.0 - dit_betas())[np.asarray(kept)]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    scheduler = scheduler_class(num_train_timesteps=len(kept), trained_betas=betas.tolist(), **config)
    # diffusers builds float32 tables; ADM's are float64 (in float32, 1 - alpha_bar near t = 0 keeps few digits).
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
    scheduler.set_timesteps(len(kept))
    return scheduler


def flow_ode_scheduler(sampler: str, num_steps: int, shift: float = 1.0) -> SchedulerMixin:
    """diffusers' flow-matching Euler or Heun scheduler over ``ode_noise_levels``: N equal steps for Euler, for
    Heun diffusers' grid ending at ``HEUN_LAST_LEVEL`` (its last step, to 0, is first order); shifted once.

    Both are configured with shift 1 and given the (already shifted) grid: Euler through ``set_timesteps(
    sigmas=...)``, Heun (whose ``set_timesteps`` takes no grid) by laying the grid out as its ``set_timesteps``
    does, every level after the first twice (the predictor's and the corrector's evaluation).
    """
    last_level = HEUN_LAST_LEVEL if sampler == "heun" else None
    levels = torch.from_numpy(ode_noise_levels(num_steps, shift, last_level)).float()
    train_steps = DIT_SCHEDULE["num_train_timesteps"]
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps)
        scheduler.set_timesteps(sigmas=levels.tolist())
        return scheduler
    scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=train_steps)
    scheduler.set_timesteps(num_steps)
    timesteps = levels * train_steps
    sigmas = torch.cat([levels, torch.zeros(1)])
    scheduler.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    return scheduler


def make_schedule(sampler: str = "ddpm", num_steps: int | None = None, clip_denoised: bool = False,
                  learn_sigma: bool = True, flow_shift: float = 1.0, objective: str | None = None) -> SamplingSchedule:
    """The schedule of the registered ``sampler`` over ``num_steps`` steps (None: its default), ready to step,
    after the one check of these settings (``check_sampling``) for a model trained with ``objective`` (None: the
    objective the sampler was registered for).

    ``learn_sigma``: whether the model also outputs a variance (DDPM then uses it); ``flow_shift``: SD3's
    timestep shift of a flow sampler's grid (1: none; the others refuse another value); ``clip_denoised``
    clips each step's predicted x0 to [-1, 1], as ADM does in pixel space (never for latents, which are not
    bounded); the flow samplers do not clip. The built-in samplers are described where they are built below.
    """
    trained_with = SAMPLERS[sampler].objective if objective is None else objective
    spec, num_steps = check_sampling(sampler, trained_with, num_steps, flow_shift)
    schedule = spec.build(num_steps, clip_denoised=clip_denoised, learn_sigma=learn_sigma,
                          flow_shift=float(flow_shift))
    schedule.stochastic = spec.stochastic
    return schedule


def ddpm_schedule(num_steps: int, *, clip_denoised: bool, learn_sigma: bool, flow_shift: float) -> SamplingSchedule:
    """ADM's ``p_sample`` over ``space_timesteps(1000, "N")`` (any N in 1..1000): with ``learn_sigma`` the model's
    learned variance (``learned_range``: it takes the full 2C-channel output), without it DiT's fixed large
    variance (beta)."""
    kept = ddpm_timesteps(num_steps)
    scheduler = respaced_scheduler(DDPMScheduler, kept, clip_sample=clip_denoised,
                                   variance_type="learned_range" if learn_sigma else "fixed_large")
    return SamplingSchedule(scheduler, torch.tensor(kept)[scheduler.timesteps], takes_variance=learn_sigma)


def ddim_schedule(num_steps: int, *, clip_denoised: bool, learn_sigma: bool, flow_shift: float) -> SamplingSchedule:
    """ADM's ``ddim_sample`` with eta = 0 over ``"ddimN"`` (N in ``DDIM_COUNTS``), its last step returning the x0
    prediction (alpha_bar_prev = 1) and its eps re-derived from the (clipped) x0; the epsilon half only."""
    kept = ddim_timesteps(num_steps)
    scheduler = respaced_scheduler(DDIMScheduler, kept, clip_sample=clip_denoised, set_alpha_to_one=True,
                                   timestep_spacing="leading")
    return SamplingSchedule(scheduler, torch.tensor(kept)[scheduler.timesteps], dict(use_clipped_model_output=True))


def dpm_solver_schedule(num_steps: int, *, clip_denoised: bool, learn_sigma: bool,
                        flow_shift: float) -> SamplingSchedule:
    """diffusers' multistep DPM-Solver++ (order 2) over linspace timesteps; the epsilon half only."""
    # Thresholding with sample_max_value=1 clamps the threshold to 1: a plain clip to [-1, 1].
    scheduler = DPMSolverMultistepScheduler(**DIT_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="linspace", thresholding=clip_denoised,
                                            sample_max_value=1.0)
    scheduler.set_timesteps(num_steps)
    return SamplingSchedule(scheduler, scheduler.timesteps)


def flow_ode_schedule(sampler: str):
    """Euler's or Heun's integration of a flow-matching model's velocity ODE from noise level 1 to 0
    (``flow_ode_scheduler``: Euler in N equal steps; Heun's last level 0.001, 2N - 1 model evaluations)."""

    def build(num_steps: int, *, clip_denoised: bool, learn_sigma: bool, flow_shift: float) -> SamplingSchedule:
        scheduler = flow_ode_scheduler(sampler, num_steps, flow_shift)
        return SamplingSchedule(scheduler, scheduler.timesteps)

    return build


def flow_sde_schedule(num_steps: int, *, clip_denoised: bool, learn_sigma: bool, flow_shift: float) -> SamplingSchedule:
    """SiT's Euler-Maruyama sampler of a flow-matching model (``FlowSDEScheduler``)."""
    scheduler = FlowSDEScheduler(num_train_timesteps=DIT_SCHEDULE["num_train_timesteps"], shift=flow_shift)
    scheduler.set_timesteps(num_steps)
    return SamplingSchedule(scheduler, scheduler.timesteps)


# The built-in samplers, each objective's default first. Step counts: DiT's (ADM's) 250 for the diffusion
# samplers; SiT's ``Sampler.sample_ode`` default, 50, for the ODE ones; the 250 of SiT's sample.py for its SDE.
register_sampler(SamplerSpec("ddpm", "ddpm", ddpm_schedule, 250, stochastic=True, check_steps=ddpm_timesteps))
register_sampler(SamplerSpec("ddim", "ddpm", ddim_schedule, 250, check_steps=ddim_timesteps))
register_sampler(SamplerSpec("dpm-solver++", "ddpm", dpm_solver_schedule, 250))
register_sampler(SamplerSpec("euler", "flow", flow_ode_schedule("euler"), 50, shifts_timesteps=True))
register_sampler(SamplerSpec("heun", "flow", flow_ode_schedule("heun"), 50, shifts_timesteps=True))
register_sampler(SamplerSpec("sde", "flow", flow_sde_schedule, 250, stochastic=True, shifts_timesteps=True,
                             min_steps=2))
