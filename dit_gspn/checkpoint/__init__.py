"""The checkpoint format: the folder training writes and sampling reads, in one package.

- ``folder``: the layout of ``<run_dir>/checkpoints/<step>/`` (model/ and ema/, sampling.json, config.yaml,
  the training state), its atomic writer, its readers and the recovery after a kill;
- ``sampling_info``: ``sampling.json``, how samples become images (``SamplingInfo``);
- ``rng_state``: every process's RNG states as safetensors;
- ``safe_load``: reading tensors and plain values without running code (``CheckpointError``).

DiT's and SiT's own ``.pt`` files are another format, read only to sample: ``dit_gspn.sampling.state_dict_file``.
"""
from .folder import (CONFIG_FILE, RESUME_KEYS, WEIGHT_FOLDERS, CheckpointDiskFullError, CheckpointWriter,
                     check_checkpoint_folder, find_rng_state, is_training_checkpoint, latest_checkpoint,
                     list_checkpoints, load_lr_scheduler_state, load_optimizer_state, read_trainer_state,
                     recover_leftovers, resolve_resume, rng_file)
from .rng_state import set_rng_state
from .safe_load import CheckpointError, load_plain_values, load_weights, state_dict_mismatch
from .sampling_info import SAMPLING_FILE, SamplingInfo

__all__ = ["CONFIG_FILE", "CheckpointDiskFullError", "CheckpointError", "CheckpointWriter", "RESUME_KEYS",
           "SAMPLING_FILE", "SamplingInfo", "WEIGHT_FOLDERS", "check_checkpoint_folder", "find_rng_state",
           "is_training_checkpoint", "latest_checkpoint", "list_checkpoints", "load_lr_scheduler_state",
           "load_optimizer_state", "load_plain_values", "load_weights", "read_trainer_state", "recover_leftovers",
           "resolve_resume", "rng_file", "set_rng_state", "state_dict_mismatch"]
