"""DiT's Gaussian diffusion: the schedule, the hybrid MSE + VLB training loss, and the schedulers."""
from .schedule import DIT_SCHEDULE, SAMPLERS, make_scheduler

__all__ = ["DIT_SCHEDULE", "SAMPLERS", "make_scheduler"]
