"""Sampling: the diffusion loop with classifier-free guidance, labelled grids, and loading a model to sample."""
from .labelled_grid import save_labelled_grid
from .sampler import sample

__all__ = ["sample", "save_labelled_grid"]
