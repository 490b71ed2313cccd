"""Class-conditional training: the config, the loop, checkpoints with exact resume, and sample grids."""
from dit_gspn.checkpoint import latest_checkpoint, list_checkpoints

from .config import ConfigError, load_config
from .trainer import NonFiniteLossError, TrainResult, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainResult", "latest_checkpoint", "list_checkpoints",
           "load_config", "train"]
