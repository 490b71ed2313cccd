"""The training objectives (DiT's Gaussian diffusion, flow matching) and the schedulers that sample them."""
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .respacing import DDIM_COUNTS, ddim_timesteps, ddpm_timesteps
from .schedule import (DIT_SCHEDULE, FLOW_SAMPLERS, OBJECTIVE_SAMPLERS, OBJECTIVES, SAMPLERS, SamplingSchedule,
                       check_num_steps, check_sampler, default_sampler, dit_betas, make_schedule)

__all__ = ["DDIM_COUNTS", "DIT_SCHEDULE", "FLOW_SAMPLERS", "OBJECTIVES", "OBJECTIVE_SAMPLERS", "SAMPLERS",
           "FlowMatching", "GaussianDiffusion", "SamplingSchedule", "check_num_steps", "check_sampler",
           "ddim_timesteps", "ddpm_timesteps", "default_sampler", "dit_betas", "make_schedule"]
