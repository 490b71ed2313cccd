"""The training objectives (DiT's Gaussian diffusion, flow matching) and the schedulers that sample them."""
from .flow import FlowMatching, shift_noise_levels
from .flow_sde import FlowSDEScheduler
from .gaussian import GaussianDiffusion
from .objective import (OBJECTIVE_SAMPLERS, OBJECTIVES, DiffusionObjective, FlowObjective, Objective,
                        UnknownObjectiveError, check_sampler, default_sampler, get_objective, objective_class,
                        objective_of_sampler)
from .respacing import DDIM_COUNTS, ddim_timesteps, ddpm_timesteps
from .schedule import (DEFAULT_NUM_STEPS, DIFFUSION_SAMPLERS, DIT_SCHEDULE, FLOW_SAMPLERS, SAMPLERS,
                       STOCHASTIC_SAMPLERS, SamplingSchedule, check_num_steps, default_num_steps, dit_betas,
                       make_schedule)

__all__ = ["DDIM_COUNTS", "DEFAULT_NUM_STEPS", "DIFFUSION_SAMPLERS", "DIT_SCHEDULE", "FLOW_SAMPLERS", "OBJECTIVES",
           "OBJECTIVE_SAMPLERS", "SAMPLERS", "STOCHASTIC_SAMPLERS", "DiffusionObjective", "FlowMatching",
           "FlowObjective", "FlowSDEScheduler", "GaussianDiffusion", "Objective", "SamplingSchedule",
           "UnknownObjectiveError", "check_num_steps", "check_sampler", "ddim_timesteps", "ddpm_timesteps",
           "default_num_steps", "default_sampler", "dit_betas", "get_objective", "make_schedule",
           "objective_class", "objective_of_sampler", "shift_noise_levels"]
