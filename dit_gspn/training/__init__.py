"""Class-conditional training: the config, the loop, checkpoints with exact resume, and sample grids."""
from .checkpoint import latest_checkpoint, list_checkpoints
from .config import ConfigError, RunConfig, load_config, parse_config
from .trainer import NonFiniteLossError, TrainResult, train

__all__ = ["ConfigError", "NonFiniteLossError", "RunConfig", "TrainResult", "latest_checkpoint", "list_checkpoints",
           "load_config", "parse_config", "train"]
