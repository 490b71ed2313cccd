"""Every random number generator's state of one process, and its file: safetensors, no pickle."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .safe_load import CheckpointError


def rng_state(noise_generator: torch.Generator) -> dict:
    """Python's, NumPy's, torch's (and CUDA's) global RNG states and ``noise_generator``'s, as a dict."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, noise_generator: torch.Generator) -> None:
    """Put back what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(state: dict, path: Path) -> None:
    """``rng_state``'s dict as safetensors: the generator states as uint8 tensors, Python's and NumPy's
    scalars as JSON metadata."""
    version, mt, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "noise": state["noise"],
               "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    for i, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda{i}"] = cuda
    meta = {"python": json.dumps([version, list(mt), gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


#: What to do about an RNG file that cannot be read, said after what is wrong with it.
_DAMAGED = ("the checkpoint's random streams cannot be put back from it: resume from an older checkpoint, or "
            "delete the file to continue with re-seeded streams (not an exact continuation)")


def _check_rng_tensors(tensors: dict, path: Path) -> None:
    """Each generator state in ``tensors`` has the dtype and length this torch's generators take."""
    reference = torch.get_rng_state()
    expected = {"torch": reference, "noise": torch.Generator().get_state()}
    for key, like in expected.items():
        got = tensors.get(key)
        if got is None:
            raise CheckpointError(f"{path} has no tensor {key!r}; {_DAMAGED}")
        if got.dtype != like.dtype or got.shape != like.shape:
            raise CheckpointError(f"{path}: {key!r} is {got.dtype} of shape {tuple(got.shape)}, a generator state "
                                  f"is {like.dtype} of shape {tuple(like.shape)}; {_DAMAGED}")
    keys = tensors.get("numpy_keys")
    if keys is None or keys.shape != (624,):
        raise CheckpointError(f"{path}: 'numpy_keys' must hold NumPy's 624 state words; {_DAMAGED}")


def load_rng_state(path: Path) -> dict:
    """The dict ``save_rng_state`` wrote to ``path``; a CheckpointError naming the file and what is wrong with
    it when it is damaged or holds other tensors."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        version, mt, gauss = json.loads(meta["python"])
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        if len(mt) != 625 or not all(isinstance(v, int) for v in mt):
            raise ValueError("Python's state must be 625 integers")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not an RNG state file written by train.py ({err}); {_DAMAGED}") from err
    _check_rng_tensors(tensors, path)
    state = {"python": (version, tuple(mt), gauss),
             "numpy": (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors["torch"], "noise": tensors["noise"]}
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda:
        state["cuda"] = cuda
    return state


def numpy_array_globals() -> list:
    """What unpickling a NumPy array needs (the RNG files of checkpoints written before safetensors)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
