"""Training checkpoints: one directory per step, written atomically, the last K kept.

``<run_dir>/checkpoints/<step:07d>/`` holds::

    model/, ema/          DiT.save_pretrained (config.json + safetensors), read by sample.py
    sampling.json         how samples become images (dit_gspn.sampling.checkpoint.SamplingInfo)
    config.yaml           the resolved training config
    optimizer.pt          AdamW state (tensors and plain values only: read with ``weights_only=True``)
    lr_scheduler.json     the learning-rate schedule's state
    trainer_state.json    step, data position (epoch, micro-batch), batch sizes, last loss
    rng/rank<r>.safetensors  every process's RNG states (python, numpy, torch, CUDA, the noise generator)

Nothing in a checkpoint is an arbitrary pickle, so loading one runs no code from it.

All processes write into ``.tmp-<step>/``; after a barrier the main process renames it to
``<step:07d>/``. A directory without ``trainer_state.json`` (written last) is never taken for a
checkpoint, so a run killed mid-write leaves the previous checkpoint as the latest. Rewriting a step
that exists (after resuming from an older one) moves the old folder to ``.old-<step>`` first; pruning
removes ``trainer_state.json`` before the rest. ``recover_leftovers`` (run before a run reads its
checkpoints) puts back an ``.old-<step>`` whose replacement never arrived and removes every other
leftover, so a kill at any point costs at most the checkpoint being written.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dit_gspn.cli import file_in_the_way
from dit_gspn.sampling.checkpoint import CheckpointError, load_plain_values

STATE_FILE = "trainer_state.json"
LR_SCHEDULER_FILE = "lr_scheduler.json"
OPTIMIZER_FILE = "optimizer.pt"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None``: start fresh. ``"latest"``: the newest complete checkpoint of ``run_dir`` (fresh if none).
    Otherwise a checkpoint directory, which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}); "
                                f"complete ones under {checkpoint_root(run_dir)}: "
                                f"{[p.name for p in list_checkpoints(run_dir)] or 'none'}")
    return path


def rng_state(noise_generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, noise_generator: torch.Generator) -> None:
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


def load_rng_state(path: Path) -> dict:
    """The dict ``save_rng_state`` wrote to ``path``."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        version, mt, gauss = json.loads(meta["python"])
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not an RNG state file written by train.py ({err})") from err
    state = {"python": (version, tuple(mt), gauss),
             "numpy": (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors["torch"], "noise": tensors["noise"]}
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda:
        state["cuda"] = cuda
    return state


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / "rng" / f"rank{rank}.safetensors"


def _numpy_array_globals() -> list:
    """What unpickling a NumPy array needs (the RNG files of checkpoints written before safetensors)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def find_rng_state(checkpoint: Path, rank: int) -> dict | None:
    """Process ``rank``'s RNG states in ``checkpoint`` (None if it has none): ``rank<r>.safetensors``, or the
    ``rank<r>.pt`` of a checkpoint from before, read with ``weights_only=True``."""
    path = rng_file(checkpoint, rank)
    if path.is_file():
        return load_rng_state(path)
    legacy = path.with_suffix(".pt")
    return load_plain_values(legacy, _numpy_array_globals()) if legacy.is_file() else None


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state of ``checkpoint`` (tensors and plain values only, see ``load_plain_values``)."""
    return load_plain_values(checkpoint / OPTIMIZER_FILE)


def save_lr_scheduler_state(state: dict, path: Path) -> None:
    path.write_text(json.dumps(state, indent=1))


def load_lr_scheduler_state(checkpoint: Path) -> dict:
    """The learning-rate schedule's state: ``lr_scheduler.json``, or the ``.pt`` of a checkpoint from before."""
    path = checkpoint / LR_SCHEDULER_FILE
    if not path.is_file() and path.with_suffix(".pt").is_file():
        return load_plain_values(path.with_suffix(".pt"))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is missing or not JSON ({err}); it holds the learning-rate schedule "
                              f"of the checkpoint") from err


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


def recover_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Undo what a kill left under ``<run_dir>/checkpoints``; returns what was done, one phrase each.

    - ``.old-<step>`` with no complete ``<step>``: the kill came between the two renames of a rewrite,
      so the old checkpoint is put back; with a complete ``<step>`` it is only a leftover, removed;
    - ``.tmp-<step>``: an unfinished write, removed;
    - ``<step>`` without ``trainer_state.json``: a checkpoint whose pruning was cut short, removed.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(".old-") and name[5:].isdigit():
            final = root / name[5:]
            if not (final / STATE_FILE).is_file() and (path / STATE_FILE).is_file():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(path, final)
                done.append(f"restored {final.name} from {name}")
                continue
            shutil.rmtree(path)
            done.append(f"removed {name}")
        elif name.startswith(".tmp-"):
            shutil.rmtree(path)
            done.append(f"removed the unfinished {name}")
        elif name.isdigit() and path.is_dir() and not (path / STATE_FILE).is_file():
            shutil.rmtree(path)
            done.append(f"removed the incomplete {name}")
    return done


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a kill midway leaves no folder that looks complete."""
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


def check_writable(folders) -> None:
    """Create each folder and write a file into it, or raise a ConfigError naming the folder that fails."""
    from .config import ConfigError

    for folder in folders:
        folder = Path(folder)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            what = "is a file, not a folder" if folder.is_file() else f"cannot be written ({err.strerror})"
            blocker = file_in_the_way(folder)
            if blocker is not None:
                what = f"cannot be created: {blocker} is a file, not a folder"
            raise ConfigError(f"{folder} {what}; the run writes there. Choose another run_dir or fix it "
                              f"before training") from err


class CheckpointWriter:
    """Writes checkpoints for one run; every process calls ``write`` (it holds the barriers)."""

    def __init__(self, accelerator, run_dir: str | os.PathLike, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")  # validate_config said so
        self.accelerator = accelerator
        self.root = checkpoint_root(run_dir)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def write(self, step: int, *, model, ema, optimizer, lr_scheduler, sampling_info, config: dict,
              trainer_state: dict, noise_generator: torch.Generator, extra_weights: dict | None = None) -> Path:
        """``extra_weights``: {folder name: module} saved beside the model (training-only modules, such as
        REPA's projector, that sampling does not load)."""
        from .config import dump_config

        acc = self.accelerator
        final = self.root / f"{step:07d}"
        tmp = self.root / f".tmp-{step:07d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed while writing
            (tmp / "rng").mkdir(parents=True)
        acc.wait_for_everyone()
        save_rng_state(rng_state(noise_generator), rng_file(tmp, acc.process_index))
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(tmp / "model")
            ema.save_pretrained(tmp / "ema")
            for name, module in (extra_weights or {}).items():
                (tmp / name).mkdir()
                state = {k: v.contiguous() for k, v in acc.unwrap_model(module).state_dict().items()}
                save_file(state, str(tmp / name / "model.safetensors"))
            sampling_info.write(tmp / "sampling.json")
            dump_config(config, tmp / "config.yaml")
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            save_lr_scheduler_state(lr_scheduler.state_dict(), tmp / LR_SCHEDULER_FILE)
            # Written last: its presence marks the checkpoint complete.
            (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # the same step written again after a resume: the new one replaces it
                old = self.root / f".old-{step:07d}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            for stale in list_checkpoints(self.root.parent)[:-self.keep_last]:
                remove_checkpoint(stale)
        acc.wait_for_everyone()
        return final


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
