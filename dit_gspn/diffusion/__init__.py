"""DiT's Gaussian diffusion: the schedule, the hybrid MSE + VLB training loss, and the schedulers."""
from .gaussian import GaussianDiffusion
from .schedule import DIT_SCHEDULE, SAMPLERS, make_scheduler

__all__ = ["DIT_SCHEDULE", "SAMPLERS", "GaussianDiffusion", "make_scheduler"]
