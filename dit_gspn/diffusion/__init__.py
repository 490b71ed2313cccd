"""The training objectives (DiT's Gaussian diffusion, flow matching) and the samplers that draw from them."""
from .flow import FlowMatching, shift_noise_levels
from .flow_sde import FlowSDEScheduler
from .gaussian import GaussianDiffusion
from .respacing import DDIM_COUNTS, ddim_timesteps, ddpm_timesteps
from .samplers import SAMPLERS, SamplerSpec, check_sampling, register_sampler, samplers_of
from .schedule import DIT_SCHEDULE, SamplingSchedule, dit_betas, make_schedule
from .objective import (OBJECTIVES, DiffusionObjective, FlowObjective, Objective, default_sampler, get_objective,
                        objective_of_sampler, register_objective)

__all__ = ["DDIM_COUNTS", "DIT_SCHEDULE", "OBJECTIVES", "SAMPLERS", "DiffusionObjective", "FlowMatching",
           "FlowObjective", "FlowSDEScheduler", "GaussianDiffusion", "Objective", "SamplerSpec", "SamplingSchedule",
           "check_sampling", "ddim_timesteps", "ddpm_timesteps", "default_sampler", "dit_betas",
           "get_objective", "make_schedule", "objective_of_sampler", "register_objective",
           "register_sampler", "samplers_of", "shift_noise_levels"]
