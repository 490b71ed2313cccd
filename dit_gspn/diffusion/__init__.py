"""The training objectives (DiT's Gaussian diffusion, flow matching) and the schedulers that sample them."""
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .schedule import (DIT_SCHEDULE, FLOW_SAMPLERS, OBJECTIVE_SAMPLERS, OBJECTIVES, SAMPLERS, check_sampler,
                       default_sampler, make_scheduler)

__all__ = ["DIT_SCHEDULE", "FLOW_SAMPLERS", "OBJECTIVES", "OBJECTIVE_SAMPLERS", "SAMPLERS", "FlowMatching",
           "GaussianDiffusion", "check_sampler", "default_sampler", "make_scheduler"]
