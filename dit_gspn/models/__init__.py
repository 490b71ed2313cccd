"""GSPN-DiT models: the DiT backbone with a registered token mixer (GSPN, attention, ...), and the zoo by name."""
from .gspn_mixer import GSPNMixer  # first: the project's mixer heads the registry
from .attention import Attention
from .dit import DiT
from .mixer import MIXERS, BlockContext, TokenMixer, register_mixer
from .pos_embed import sincos_pos_embed_2d
from .zoo import MODEL_CLASSES, MODELS, create_model, register_family

__all__ = ["Attention", "BlockContext", "DiT", "GSPNMixer", "MIXERS", "MODELS", "MODEL_CLASSES", "TokenMixer",
           "create_model", "register_family", "register_mixer", "sincos_pos_embed_2d"]
