"""GSPN-DiT models: the DiT backbone with a GSPN or attention token mixer, and the zoo by name."""
from .attention import Attention
from .dit import DiT, DiT_models, create_model
from .gspn_mixer import GSPNMixer
from .pos_embed import sincos_pos_embed_2d

__all__ = ["Attention", "DiT", "DiT_models", "GSPNMixer", "create_model", "sincos_pos_embed_2d"]
