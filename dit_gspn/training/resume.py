"""Where a run starts: its folder checked and cleaned, the checkpoint to continue, and what that checkpoint restores.

``open_run_folder`` runs before anything is built: every folder the run writes to is writable, the run folder
is locked for this launch (a second command on it is refused, naming the first), a killed run's leftovers are
undone, and a resumed checkpoint's config and step are compared with this one's.
``read_checkpoint`` loads the weights into the model and its EMA (before ``accelerate.prepare``) and reads
the rest (position, optimizer, learning-rate schedule, this process's RNG), which ``Restored.apply`` puts
back once the optimizer is prepared and the streams are seeded.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dit_gspn.checkpoint import (RESUME_KEYS, CheckpointError, find_rng_state, latest_checkpoint,
                                 load_lr_scheduler_state, load_optimizer_state, load_weights, read_trainer_state,
                                 recover_leftovers, resolve_resume, rng_file, set_rng_state, state_dict_mismatch)
from dit_gspn.folder_lock import decide_on_main_process, lock_folder

from .config import ConfigError, RunConfig, config_changes, read_saved_config
from .run_folder import check_writable

#: How a run's random streams are seeded, recorded in trainer_state.json: a checkpoint without it was written
#: when they were ``seed * 1_000_003 + index``, whose data order a resume no longer repeats.
SEEDING = "seed_sequence"


def run_folders(run_dir: Path, tensorboard: bool) -> list[Path]:
    """Every folder the run will write to."""
    folders = [run_dir, run_dir / "checkpoints", run_dir / "samples"]
    if tensorboard:
        folders.append(run_dir / "tensorboard")
    return folders


def resume_command(checkpoint: Path, steps: int | None = None, lift_time_limit: bool = False) -> str:
    """The command line that continues a run from ``checkpoint`` (its own config.yaml is the base config):
    ``steps`` sets ``train.steps``, ``lift_time_limit`` drops ``train.time_limit_minutes``."""
    overrides = ([f"train.steps={steps}"] if steps is not None else []) + (
        ["train.time_limit_minutes=null"] if lift_time_limit else [])
    return " ".join(["python train.py --resume", shlex.quote(str(checkpoint)), *overrides])


def check_fresh_run_folder(run_dir: Path, where: str = "run_dir", train_longer: bool = False) -> None:
    """Refuse a fresh run in ``run_dir`` (named as ``where`` chose it) when it holds checkpoints, with the command
    that continues its newest one (``train_longer``: to twice its step and without a time limit, as the demo
    offers)."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return
    steps = 2 * max(read_trainer_state(newest).get("step", 0), 1) if train_longer else None
    raise ConfigError(f"{where} {run_dir} already holds checkpoints (newest {newest}): continue it with "
                      f"`{resume_command(newest, steps, lift_time_limit=train_longer)}`, or choose another {where}")


def check_resume_config(checkpoint: Path, config: RunConfig, allow_change: bool, is_main: bool) -> None:
    """Refuse (unless ``allow_change``) a resume whose config differs from the checkpoint's in a key that
    changes the arithmetic of the run, naming each such key with its old and new value."""
    changes = config_changes(read_saved_config(checkpoint), config.to_dict())
    if not changes:
        return
    detail = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changes.items())
    if not allow_change:
        raise ConfigError(f"--resume {checkpoint}: the config differs from the one it was trained with ({detail}); "
                          f"an exact resume needs the same model, seed, data and training settings. Drop these "
                          f"overrides, or pass --allow-config-change to continue with them anyway")
    if is_main:
        print(f"resuming {checkpoint} with a changed config ({detail}): the run is no longer an exact "
              f"continuation", flush=True)


def check_resume_step(checkpoint: Path, config: RunConfig) -> None:
    """Refuse to resume a checkpoint that is past ``train.steps`` (the run would end without a step)."""
    step = read_trainer_state(checkpoint, required=RESUME_KEYS)["step"]
    if step > config.train.steps:
        raise ConfigError(f"train.steps={config.train.steps} is below the step of {checkpoint} (step {step}): "
                          f"raise train.steps to train on from it, or resume an earlier checkpoint")


def open_run_folder(config: RunConfig, resume: str | None, allow_config_change: bool, acc) -> Path | None:
    """Check that every folder the run writes to is writable, lock the run folder for this launch, undo what a
    killed run left in its checkpoints, and return the checkpoint to resume (None: a fresh start), its config
    and step compared with ``config``'s."""
    run_dir = Path(config.run_dir)
    check_writable(run_folders(run_dir, config.logging.tensorboard))  # on every process: none waits for a failed one

    def lock_and_recover():
        lock_folder(run_dir, "a training run")  # before recovering: a running writer's .tmp- is not a leftover
        for note in recover_leftovers(run_dir):
            print(f"{run_dir / 'checkpoints'}: {note} (left by a run that was stopped while writing)", flush=True)

    decide_on_main_process(acc, lock_and_recover)
    acc.wait_for_everyone()
    checkpoint = resolve_resume(resume, run_dir)
    if resume is None:
        check_fresh_run_folder(run_dir)
    if resume == "latest" and checkpoint is None and acc.is_main_process:
        print(f"note: --resume found no complete checkpoint in {run_dir / 'checkpoints'}: starting a fresh run "
              f"there (check run_dir if you meant to continue another run)", file=sys.stderr, flush=True)
    if checkpoint is not None:
        check_resume_config(checkpoint, config, allow_config_change, acc.is_main_process)
        check_resume_step(checkpoint, config)
    return checkpoint


def load_model_weights(module: torch.nn.Module, folder: Path, name: str) -> None:
    """``folder``'s safetensors weights into ``module``, or a CheckpointError naming what does not fit."""
    state = load_weights(folder)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the {name} weights in {folder} do not fit the model of this config: "
                              f"{state_dict_mismatch(module, state)}") from err


@dataclass
class Restored:
    """What a checkpoint gives back besides the weights: where the run stands and the states to put back."""

    checkpoint: Path
    step: int
    position: tuple[int, int]  # (epoch, next micro-batch in it)
    num_processes: int          # of the run that wrote it
    optimizer_state: dict
    scheduler_state: dict
    rng: dict | None            # this process's RNG states; None when the number of processes changed, or when
                                # its file is missing
    seeding: str | None         # how the writing run seeded its streams (``SEEDING``; None: before it existed)

    def apply(self, optimizer, lr_scheduler, noise_generator: torch.Generator, acc) -> None:
        """Put the optimizer, schedule and RNG states back (after ``accelerate.prepare`` and the seeding)."""
        try:
            optimizer.load_state_dict(self.optimizer_state)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.checkpoint / 'optimizer.pt'} does not fit this model's optimizer: "
                                  f"{err}") from err
        try:
            lr_scheduler.load_state_dict(self.scheduler_state)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"the learning-rate schedule in {self.checkpoint} does not fit this run's: "
                                  f"{err}") from err
        if self.rng is not None:
            set_rng_state(self.rng, noise_generator)
        elif self.num_processes == acc.num_processes:
            print(f"note: {rng_file(self.checkpoint, acc.process_index)} is missing: this process's random "
                  f"streams are re-seeded, so the run is not an exact continuation of {self.checkpoint}",
                  file=sys.stderr, flush=True)
        elif acc.is_main_process:
            print(f"resuming {self.checkpoint} with {acc.num_processes} processes instead of {self.num_processes}: "
                  f"the data order continues exactly, the noise streams are re-seeded")
        if self.seeding != SEEDING and acc.is_main_process:
            print(f"resuming {self.checkpoint}, written before per-index seeds: the data order from here on is "
                  f"not the one that run would have visited (the noise streams continue exactly)", flush=True)


def read_checkpoint(checkpoint: Path, model: torch.nn.Module, ema: torch.nn.Module, global_micro_batch: int,
                    acc) -> Restored:
    """Load ``checkpoint``'s weights into ``model`` and ``ema`` and read the rest of its state; a ConfigError
    when this launch's samples per micro-batch (over all processes) differ from the checkpoint's."""
    state = read_trainer_state(checkpoint, required=RESUME_KEYS)
    load_model_weights(model, checkpoint / "model", "model")
    load_model_weights(ema, checkpoint / "ema", "EMA")
    if state["global_micro_batch"] != global_micro_batch:
        raise ConfigError(f"{checkpoint} was trained with {state['global_micro_batch']} samples per micro-batch "
                          f"over all processes; this launch gives {global_micro_batch}: keep "
                          f"global_batch_size / grad_accum_steps the same to resume")
    same_processes = state["num_processes"] == acc.num_processes
    return Restored(checkpoint=checkpoint, step=int(state["step"]),
                    position=(int(state["epoch"]), int(state["batch_in_epoch"])),
                    num_processes=state["num_processes"], optimizer_state=load_optimizer_state(checkpoint),
                    scheduler_state=load_lr_scheduler_state(checkpoint),
                    rng=find_rng_state(checkpoint, acc.process_index) if same_processes else None,
                    seeding=state.get("seeding"))
