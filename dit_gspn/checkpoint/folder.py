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
checkpoint being written. A write that fails (a full disk: ``CheckpointDiskFullError``) removes its
``.tmp-<step>/`` and leaves every finished checkpoint as it was.

The readers check what they read: a state file that is truncated or holds a key of the wrong type is a
``CheckpointError`` naming the file and the key, not a traceback from deep inside the resume.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from dit_gspn.atomic_write import DiskFullError, is_disk_full
from dit_gspn.errors import MissingFileError

from .json_values import is_count, is_number, is_numbers
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


def check_checkpoint_folder(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """``path`` if it is a complete training checkpoint; otherwise one line saying what it is instead (missing,
    a file, a run folder, an unfinished checkpoint) and, given ``run_dir``, which checkpoints that run has."""
    path = Path(path)
    known = ""
    if run_dir is not None:
        known = (f"; complete ones under {checkpoint_root(run_dir)}: "
                 f"{[p.name for p in list_checkpoints(run_dir)] or 'none'}")
    if not path.exists():
        raise MissingFileError(f"--resume {path} does not exist{known}")
    if not path.is_dir():
        raise CheckpointError(f"--resume {path} is a file; pass a checkpoint folder "
                              f"(<run_dir>/checkpoints/<step>){known}")
    if not (path / STATE_FILE).is_file() and checkpoint_root(path).is_dir():
        newest = latest_checkpoint(path)
        raise CheckpointError(f"--resume {path} is a run folder, not a checkpoint: pass one of its checkpoints "
                              f"(the newest complete one is {newest or 'none'}), or --resume alone with the run's "
                              f"--config to continue its newest")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}){known}")
    return path


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``None``: start fresh. ``"latest"``: the newest complete checkpoint of ``run_dir`` (fresh if none).
    Otherwise a checkpoint directory, which must be complete (``check_checkpoint_folder``)."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    return check_checkpoint_folder(resume, run_dir)


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


def _read_json_mapping(path: Path, what: str) -> dict:
    """The JSON object in ``path``, or a CheckpointError naming the file (missing, truncated, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is missing, truncated or not JSON ({err}); it holds {what}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not the JSON object of {what}")
    return data


#: What each key of trainer_state.json must hold, and how to say it.
TRAINER_STATE_KEYS = {
    "step": (is_count, "an integer >= 0"),
    "epoch": (is_count, "an integer >= 0"),
    "batch_in_epoch": (is_count, "an integer >= 0"),
    "num_processes": (lambda v: is_count(v, 1), "an integer >= 1"),
    "global_micro_batch": (lambda v: is_count(v, 1), "an integer >= 1"),
    "grad_accum_steps": (lambda v: is_count(v, 1), "an integer >= 1"),
    "loss": (lambda v: v is None or is_number(v), "a number or null"),
    "seeding": (lambda v: v is None or isinstance(v, str), "a string or null"),
}
#: The keys a resume needs (a checkpoint's own trainer_state.json always has them).
RESUME_KEYS = ("step", "epoch", "batch_in_epoch", "num_processes", "global_micro_batch")


def _check_keys(data: dict, path: Path, kinds: dict, required=()) -> dict:
    for key in required:
        if key not in data:
            raise CheckpointError(f"{path} lacks the key {key!r} ({kinds[key][1]}); the checkpoint is damaged: "
                                  f"resume from another one")
    for key, (fits, want) in kinds.items():
        if key in data and not fits(data[key]):
            raise CheckpointError(f"{path}: {key} must be {want}, got {data[key]!r}; the checkpoint is damaged: "
                                  f"resume from another one")
    return data


def load_lr_scheduler_state(checkpoint: Path) -> dict:
    """The learning-rate schedule's state: ``lr_scheduler.json``, or the ``.pt`` of a checkpoint from before;
    a CheckpointError naming the file and the key when it is damaged."""
    path = checkpoint / LR_SCHEDULER_FILE
    if not path.is_file() and path.with_suffix(".pt").is_file():
        path = path.with_suffix(".pt")
        state = load_plain_values(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a learning-rate schedule's state")
    else:
        state = _read_json_mapping(path, "the learning-rate schedule of the checkpoint")
    return _check_keys(state, path, {"last_epoch": (lambda v: is_count(v, -1), "an integer >= -1"),
                                     "base_lrs": (is_numbers, "a list of numbers")},
                       required=("last_epoch", "base_lrs"))


def read_trainer_state(checkpoint: Path, required=()) -> dict:
    """``trainer_state.json`` (step, data position, batch sizes, last loss), each key it holds of the right type
    and every key in ``required`` present (``RESUME_KEYS`` for a resume); a CheckpointError naming the file and
    the key otherwise."""
    path = checkpoint / STATE_FILE
    state = _read_json_mapping(path, "the checkpoint's step and data position")
    return _check_keys(state, path, TRAINER_STATE_KEYS, required)


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


class CheckpointDiskFullError(CheckpointError, DiskFullError):
    """The disk filled up while a checkpoint was written: the partial one is removed, the finished ones kept."""


class CheckpointWriter:
    """Writes checkpoints for one run; every process calls ``write`` (it holds the barriers).

    ``accelerator`` is an ``accelerate.Accelerator`` (or anything with its ``is_main_process``,
    ``process_index``, ``wait_for_everyone`` and ``unwrap_model``).
    """

    def __init__(self, accelerator, run_dir: str | os.PathLike, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")  # the config's validate said so
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
        failure = None
        if acc.is_main_process:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a run killed while writing
                (tmp / "rng").mkdir(parents=True)
            except Exception as err:  # noqa: BLE001 (every process must learn of it first: see below)
                failure = err
        if self._anyone_failed(failure):
            self._abandon(step, tmp, failure)
        try:
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
        except Exception as err:  # noqa: BLE001
            failure = err
        if self._anyone_failed(failure):  # also the barrier between the writes and the rename
            self._abandon(step, tmp, failure)
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

    def _anyone_failed(self, failure: BaseException | None) -> bool:
        """Whether the write failed on any process; every process calls it (a barrier)."""
        acc = self.accelerator
        if getattr(acc, "num_processes", 1) == 1:
            return failure is not None
        failed = acc.reduce(torch.tensor(float(failure is not None), device=acc.device), "sum")
        return bool(failed.item() > 0)

    def _abandon(self, step: int, tmp: Path, failure: BaseException | None):
        """Remove the partial ``tmp`` (main process) and raise: a CheckpointDiskFullError for a full disk, the
        error itself otherwise (a fault that keeps its traceback)."""
        full = failure is not None and is_disk_full(failure, self.root)  # before the partial files go
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None and not full:
            raise failure
        if failure is None:
            raise CheckpointError(f"another process could not write its part of checkpoint {step} under "
                                  f"{self.root} (its own error says why); the partial {tmp.name} was removed")
        raise CheckpointDiskFullError(
            f"no space left on {self.root} while writing checkpoint {step}: the partial {tmp.name} was removed and "
            f"the finished checkpoints are kept (newest: {self.latest() or 'none'}); free space there, then "
            f"continue with --resume") from failure
