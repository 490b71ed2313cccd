"""Reading tensors and plain values from a checkpoint without running code from it, and the error that names
what is wrong with one."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dit_gspn.errors import MissingFileError, UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, of another model, or holding more than weights and values."""


def load_plain_values(path: Path, allowed: list = ()):
    """``torch.load(path, weights_only=True)``: tensors and plain values only (and the ``allowed`` globals),
    so a file that would run code is refused with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise MissingFileError(f"{path} is missing") from err
    except Exception as err:  # UnpicklingError for a planted object; anything else is a damaged file
        lines = str(err).splitlines() or [""]
        # torch names the refused object on a later line ("... Unsupported global: GLOBAL module.name ...").
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values (loading a "
                              f"checkpoint never needs to run code), or it is damaged ({type(err).__name__}: "
                              f"{why})") from err


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``save_pretrained`` folder (all its safetensors files)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{f} is not a readable safetensors file ({err})") from err
    return state


def state_dict_mismatch(model: torch.nn.Module, state: dict) -> str:
    """One line on why ``state`` does not load into ``model``: counts of missing, unexpected and
    mis-shaped keys, with the first of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shaped)) if found]
    return "; ".join(parts) or "the keys and shapes match"
