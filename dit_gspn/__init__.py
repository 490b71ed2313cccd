"""GSPN-DiT: diffusion transformers whose token mixer is the Generalized Spatial Propagation Network."""

__version__ = "0.1.0"
