"""The training objectives (DiT's Gaussian diffusion, flow matching) and the schedulers that sample them."""
from .flow import FlowMatching, shift_noise_levels
from .flow_sde import FlowSDEScheduler
from .gaussian import GaussianDiffusion
from .respacing import DDIM_COUNTS, ddim_timesteps, ddpm_timesteps
from .schedule import (DEFAULT_NUM_STEPS, DIT_SCHEDULE, FLOW_SAMPLERS, OBJECTIVE_SAMPLERS, OBJECTIVES, SAMPLERS,
                       STOCHASTIC_SAMPLERS, SamplingSchedule, check_num_steps, check_sampler, default_num_steps,
                       default_sampler, dit_betas, make_schedule)

__all__ = ["DDIM_COUNTS", "DEFAULT_NUM_STEPS", "DIT_SCHEDULE", "FLOW_SAMPLERS", "OBJECTIVES", "OBJECTIVE_SAMPLERS",
           "SAMPLERS", "STOCHASTIC_SAMPLERS", "FlowMatching", "FlowSDEScheduler", "GaussianDiffusion",
           "SamplingSchedule", "check_num_steps", "check_sampler", "ddim_timesteps", "ddpm_timesteps",
           "default_num_steps", "default_sampler", "dit_betas", "make_schedule", "shift_noise_levels"]
