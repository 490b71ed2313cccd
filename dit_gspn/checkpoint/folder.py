"""The training checkpoint folder: one directory per step, written atomically, the last K kept, and read back.

``<run_dir>/checkpoints/<step:07d>/`` holds::

    model/, ema/          DiT.save_pretrained (config.json + safetensors), read by sample.py
    sampling.json         how samples become images (``SamplingInfo``)
    config.yaml           the resolved training config
    optimizer.pt          AdamW state (tensors and plain values only: read with ``weights_only=True``)
    lr_scheduler.json     the learning-rate schedule's state
    trainer_state.json    step, data position (epoch, micro-batch), batch sizes, last loss
    rng/rank<r>.safetensors  every process's RNG states (python, numpy, torch, CUDA, the noise generator)

Nothing in a checkpoint is an arbitrary pickle, so loading one runs no code from it.

All processes write into ``.tmp-<step>/``; after a barrier the main process renames it to
``<step:07d>/`` (the folder's own renames, not ``dit_gspn.atomic_write``: a folder is swapped as a whole).
A directory without ``trainer_state.json`` (written last) is never taken for a checkpoint, so a run killed
mid-write leaves the previous checkpoint as the latest. Rewriting a step that exists (after resuming from
an older one) moves the old folder to ``.old-<step>`` first; pruning removes ``trainer_state.json`` before
the rest. ``recover_leftovers`` (run before a run reads its checkpoints) puts back an ``.old-<step>`` whose
replacement never arrived and removes every other leftover, so a kill at any point costs at most the
checkpoint being written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .rng_state import load_rng_state, numpy_array_globals, rng_state, save_rng_state
from .safe_load import CheckpointError, load_plain_values
from .sampling_info import SAMPLING_FILE

STATE_FILE = "trainer_state.json"
LR_SCHEDULER_FILE = "lr_scheduler.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
#: The two weight folders, each a ``DiT.save_pretrained``: the EMA weights (what sampling takes by default)
#: and the trained ones.
WEIGHT_FOLDERS = ("ema", "model")

def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder laid out as a training checkpoint (it has ``sampling.json``)."""
    return (Path(path) / SAMPLING_FILE).is_file()


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


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / "rng" / f"rank{rank}.safetensors"


def find_rng_state(checkpoint: Path, rank: int) -> dict | None:
    """Process ``rank``'s RNG states in ``checkpoint`` (None if it has none): ``rank<r>.safetensors``, or the
    ``rank<r>.pt`` of a checkpoint from before, read with ``weights_only=True``."""
    path = rng_file(checkpoint, rank)
    if path.is_file():
        return load_rng_state(path)
    legacy = path.with_suffix(".pt")
    return load_plain_values(legacy, numpy_array_globals()) if legacy.is_file() else None


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state of ``checkpoint`` (tensors and plain values only, see ``load_plain_values``)."""
    return load_plain_values(checkpoint / OPTIMIZER_FILE)


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


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


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


def write_config(folder: Path, config: dict) -> Path:
    """``folder/config.yaml``: the resolved config (a mapping) as the checkpoint and the run folder keep it."""
    path = Path(folder) / CONFIG_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class CheckpointWriter:
    """Writes checkpoints for one run; every process calls ``write`` (it holds the barriers).

    ``accelerator`` is an ``accelerate.Accelerator`` (or anything with its ``is_main_process``,
    ``process_index``, ``wait_for_everyone`` and ``unwrap_model``).
    """

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
        """Write checkpoint ``step`` and prune the oldest beyond ``keep_last``; returns its folder.

        ``config`` is the resolved config as a mapping (written as ``config.yaml``); ``extra_weights``
        ({folder name: module}) are saved beside the model as ``<name>/model.safetensors`` (training-only
        modules, such as REPA's projector, that sampling does not load; read back with ``load_weights``).
        """
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
            sampling_info.write(tmp / SAMPLING_FILE)
            write_config(tmp, config)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            (tmp / LR_SCHEDULER_FILE).write_text(json.dumps(lr_scheduler.state_dict(), indent=1))
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
