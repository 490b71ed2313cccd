"""DiT's noise schedule, and the diffusers schedulers that sample with it (and with flow matching).

The one place the schedule is defined: 1000 steps, linear betas 1e-4 to 0.02 (as DiT and ADM).
A model trained with one objective is sampled only by that objective's samplers (``check_sampler``).
"""
from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)

#: DiT's training schedule, as diffusers scheduler arguments.
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

#: The samplers of each training objective, its default first: DiT's epsilon + learned variance
#: (``GaussianDiffusion``), and flow matching's velocity (``FlowMatching``, an ODE).
OBJECTIVE_SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm-solver++"), "flow": ("euler", "heun")}
OBJECTIVES = tuple(OBJECTIVE_SAMPLERS)
SAMPLERS = tuple(s for samplers in OBJECTIVE_SAMPLERS.values() for s in samplers)
FLOW_SAMPLERS = OBJECTIVE_SAMPLERS["flow"]


def default_sampler(objective: str) -> str:
    """The sampler a model trained with ``objective`` is drawn with unless one is named."""
    check_objective(objective)
    return OBJECTIVE_SAMPLERS[objective][0]


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVE_SAMPLERS:
        raise ValueError(f"unknown training objective {objective!r}; choose one of {OBJECTIVES}")


def check_sampler(sampler: str, objective: str) -> None:
    """Raise a ValueError unless ``sampler`` draws from models trained with ``objective``."""
    check_objective(objective)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler not in OBJECTIVE_SAMPLERS[objective]:
        raise ValueError(f"sampler {sampler!r} does not fit a model trained with the {objective!r} objective; "
                         f"use one of {OBJECTIVE_SAMPLERS[objective]}")


def make_scheduler(sampler: str = "ddpm", num_steps: int = 250, clip_denoised: bool = False):
    """A diffusers scheduler for DiT's schedule, with ``set_timesteps(num_steps)`` already called.

    ``ddpm`` uses the model's learned variance (``learned_range``: it takes the model's full 2C-channel
    output); ``ddim`` and ``dpm-solver++`` take the epsilon half only. Timesteps are spaced as ADM
    respaces them: DDPM and DPM-Solver++ evenly over [0, 999] (999, 995, ... for 250 steps), DDIM
    every 1000 // N steps from 0 (ADM's ``ddimN``: 980, 960, ..., 0 for 50 steps).
    ``euler`` and ``heun`` integrate a flow-matching model's velocity ODE from noise level 1 to 0 over
    ``num_steps`` evenly spaced levels (Heun: 2 * num_steps - 1 model evaluations).
    ``clip_denoised`` clips each step's predicted x0 to [-1, 1], as ADM does in pixel space (never for
    latents, which are not bounded); the flow samplers do not clip.
    """
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**DIT_SCHEDULE, variance_type="learned_range", clip_sample=clip_denoised,
                                  timestep_spacing="linspace")
    elif sampler == "ddim":
        # ADM's "ddimN" respacing (every 1000 // N steps from 0); diffusers' DDIM steps to
        # t - 1000 // N, which only matches the timestep list under this spacing.
        scheduler = DDIMScheduler(**DIT_SCHEDULE, clip_sample=clip_denoised, set_alpha_to_one=False,
                                  timestep_spacing="leading")
    elif sampler == "dpm-solver++":
        # Thresholding with sample_max_value=1 clamps the threshold to 1: a plain clip to [-1, 1].
        scheduler = DPMSolverMultistepScheduler(**DIT_SCHEDULE, algorithm_type="dpmsolver++",
                                                solver_order=2, timestep_spacing="linspace",
                                                thresholding=clip_denoised, sample_max_value=1.0)
    elif sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=DIT_SCHEDULE["num_train_timesteps"])
    elif sampler == "heun":
        scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=DIT_SCHEDULE["num_train_timesteps"])
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    return scheduler
