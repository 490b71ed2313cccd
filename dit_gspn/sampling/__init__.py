"""Sampling: the diffusion loop with classifier-free guidance, labelled grids, and loading a model to sample."""
from dit_gspn.image_npz import to_uint8

from .labelled_grid import save_labelled_grid
from .sampler import sample

__all__ = ["sample", "save_labelled_grid", "to_uint8"]
