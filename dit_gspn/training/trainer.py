"""The training loop: one code path for a laptop CPU, one GPU, or many nodes (accelerate decides which).

DiT's recipe: AdamW (lr 1e-4, no weight decay), the hybrid MSE + VLB loss with uniform t, EMA of
the weights. Added: flow matching as an alternative objective (``train.objective=flow``), warm-up,
gradient clipping, gradient accumulation, mixed precision, gradient checkpointing, torch.compile,
atomic checkpoints and exact resume.

Exact resume: the data order is a pure function of (seed, epoch, micro-batch) (``EpochBatchSampler``),
timesteps and noise come from a per-process generator, label dropout from the per-process global
RNG; a checkpoint stores the position and every state, so a resumed run repeats the same arithmetic.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dit_gspn.cli import UserError
from dit_gspn.data import ShardError
from dit_gspn.diffusion import FlowMatching, GaussianDiffusion
from dit_gspn.sampling.checkpoint import CheckpointError, state_dict_mismatch

from .checkpoint import (CheckpointWriter, check_writable, latest_checkpoint, load_lr_scheduler_state,
                         find_rng_state, load_optimizer_state, load_weights, read_trainer_state, recover_leftovers,
                         resolve_resume, set_rng_state)
from .config import ConfigError, complete_config, config_changes, read_saved_config, resolve_objective, validate_config
from .data_order import EpochBatchSampler
from .datasets import TrainingData, build_training_data
from .ema import ema_decay_at, make_ema, update_ema
from .fid_monitor import FidMonitor
from .grids import GridWriter, grid_labels
from .repa import PROJECTOR_DIR, RepresentationAlignment


class NonFiniteLossError(UserError, RuntimeError):
    """The loss (or the weights) became NaN or infinite; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint written (or resumed from)
    step: int
    loss: float              # mean loss over the last logging window
    grid: Path | None        # the last sample grid written
    model: torch.nn.Module   # the trained model (unwrapped) and its EMA, on this process
    ema: torch.nn.Module


def build_model(config: dict, data: TrainingData):
    """The zoo model ``config["model"]["name"]`` with the data's channels, size and classes filled in."""
    from dit_gspn.models import create_model

    kwargs = {k: v for k, v in config["model"].items() if k != "name"}
    kwargs.update(in_channels=data.in_channels, input_size=data.input_size, num_classes=data.num_classes)
    try:
        return create_model(config["model"]["name"], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model settings {kwargs} do not fit DiT's constructor: {exc}") from exc


def build_objective(train_config: dict):
    """(objective, loss) for ``train.objective``: ``loss(model, x, t, model_kwargs, noise)`` gives per-sample
    losses, ``objective.sample_timesteps(batch, device, generator)`` the t it expects."""
    if train_config["objective"] == "flow":
        flow = FlowMatching(timestep_sampling=train_config["flow_timesteps"], shift=train_config["flow_shift"])
        return flow, flow.training_losses
    diffusion = GaussianDiffusion()
    snr_gamma = None if train_config["snr_gamma"] is None else float(train_config["snr_gamma"])
    return diffusion, partial(diffusion.training_losses, snr_gamma=snr_gamma)


def _micro_batches(dataset, micro_batch: int, acc, seed: int, epoch: int, start: int, num_workers: int):
    """Yields (x, y, position after this batch) forever, epoch after epoch, from (epoch, start)."""
    while True:
        sampler = EpochBatchSampler(len(dataset), micro_batch, acc.num_processes, acc.process_index, seed,
                                    epoch=epoch, start=start)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the label-dropout stream of a resumed run by one draw.
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            pin_memory=acc.device.type == "cuda",
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b, (x, y) in enumerate(loader, start=start):
            yield x, y, (epoch, b + 1)
        epoch, start = epoch + 1, 0


def build_alignment(config: dict, model: torch.nn.Module, data: TrainingData, device) -> RepresentationAlignment | None:
    """The REPA term ``config["repa"]`` asks for (its encoder loaded, its projector fresh), or None when off."""
    from .encoders import load_encoder

    rc = config["repa"]
    if rc["block"] is None:
        return None
    try:
        return RepresentationAlignment(model, load_encoder(rc["encoder"]), block=int(rc["block"]),
                                       coefficient=float(rc["coefficient"]), projector_dim=int(rc["projector_dim"]),
                                       info=data.sampling_info, device=device)
    except ValueError as err:
        raise ConfigError(f"repa: {err}") from err


def _lr_lambda(warmup_steps: int):
    if warmup_steps <= 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def _load_model_weights(module: torch.nn.Module, folder: Path, name: str) -> None:
    state = load_weights(folder)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the {name} weights in {folder} do not fit the model of this config: "
                              f"{state_dict_mismatch(module, state)}") from err


def _check_resume_config(checkpoint: Path, config: dict, allow_change: bool, is_main: bool) -> None:
    """Refuse (unless ``allow_change``) a resume whose config differs from the checkpoint's in a key that
    changes the arithmetic of the run, naming each such key with its old and new value."""
    changes = config_changes(read_saved_config(checkpoint), config)
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


def _check_fits_dataset(data: TrainingData, micro_batch: int, num_processes: int, config: dict) -> None:
    if len(data.dataset) < micro_batch * num_processes:
        tc = config["train"]
        raise ConfigError(f"train.global_batch_size={tc['global_batch_size']} / train.grad_accum_steps="
                          f"{tc['grad_accum_steps']} gives {micro_batch * num_processes} samples per micro-batch, "
                          f"but the dataset holds only {len(data.dataset)}: lower the batch size or use more data")


def _run_folders(run_dir: Path, logging: dict) -> list[Path]:
    """Every folder the run will write to."""
    folders = [run_dir, run_dir / "checkpoints", run_dir / "samples"]
    if logging["tensorboard"]:
        folders.append(run_dir / "tensorboard")
    return folders


def set_compile_cache() -> Path:
    """Point torch.compile's cache at ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``~/.cache/dit_gspn/inductor``
    (not a temp folder that is recompiled into every run); returns it."""
    default = Path.home() / ".cache" / "dit_gspn" / "inductor"
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))


def _open_run_folder(config: dict, resume: str | None, allow_config_change: bool, acc) -> Path | None:
    """Check that every folder the run writes to is writable, undo what a killed run left in its checkpoints,
    and return the checkpoint to resume (None: a fresh start), its config compared with ``config``."""
    run_dir = Path(config["run_dir"])
    check_writable(_run_folders(run_dir, config["logging"]))  # on every process: none waits for a failed one
    if acc.is_main_process:
        for note in recover_leftovers(run_dir):
            print(f"{run_dir / 'checkpoints'}: {note} (left by a run that was stopped while writing)", flush=True)
    acc.wait_for_everyone()
    checkpoint = resolve_resume(resume, run_dir)
    if resume is None and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose "
                          f"another run_dir")
    if checkpoint is not None:
        _check_resume_config(checkpoint, config, allow_config_change, acc.is_main_process)
    return checkpoint


def _finite(tensors) -> bool:
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def _non_finite_inputs(step_inputs, dataset, micro_batch: int, acc, seed: int) -> list[str]:
    """Where the non-finite values among this step's micro-batches come from (dataset rows), if any."""
    found = []
    for x, (epoch, after) in step_inputs:
        bad_rows = (~x.isfinite()).flatten(1).any(1).nonzero().flatten().tolist()
        if not bad_rows:
            continue
        order = EpochBatchSampler(len(dataset), micro_batch, acc.num_processes, acc.process_index, seed,
                                  epoch=epoch).batch_indices(after - 1)
        locate = getattr(dataset, "locate", lambda i: f"item {i}")
        found += [locate(order[r]) for r in bad_rows]
    return found


def train(config: dict, resume: str | None = None, allow_config_change: bool = False) -> TrainResult:
    """Run (or continue) the training run that ``config`` describes; see ``configs/*.yaml`` for the keys.

    ``resume``: None (fresh start; an existing run directory with checkpoints is an error),
    "latest" (continue from the newest complete checkpoint, or start fresh if there is none), or a
    checkpoint directory, whose saved config must match ``config`` in every key that changes the run's
    arithmetic unless ``allow_config_change``. The whole config, the data and the run folder are checked
    before the model is built. Raises ``NonFiniteLossError`` naming the step and the last good checkpoint
    (``ShardError`` naming the shard rows when the data holds the NaN).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    config = complete_config(config)
    validate_config(config)
    config = resolve_objective(config)
    tc, lc, cc = config["train"], config["logging"], config["checkpoint"]
    run_dir = Path(config["run_dir"])
    try:
        acc = Accelerator(mixed_precision=tc["mixed_precision"], cpu=bool(tc["cpu"]),
                          kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    except ValueError as err:  # accelerate's word on a precision the device cannot do (fp16 on a CPU, ...)
        raise ConfigError(f"train.mixed_precision={tc['mixed_precision']} with train.cpu={tc['cpu']}: {err}") from err
    accum = int(tc["grad_accum_steps"])
    per_step = acc.num_processes * accum
    if tc["global_batch_size"] % per_step:
        raise ConfigError(f"train.global_batch_size={tc['global_batch_size']} must be divisible by "
                          f"processes x grad_accum_steps = {acc.num_processes} x {accum}")
    micro_batch = tc["global_batch_size"] // per_step

    checkpoint = _open_run_folder(config, resume, allow_config_change, acc)

    seed = int(config["seed"])
    torch.manual_seed(seed)  # the same initial weights on every process
    data = build_training_data(config)
    _check_fits_dataset(data, micro_batch, acc.num_processes, config)
    grid_labels(data.num_classes, lc["sample_classes"], lc["samples_per_class"])  # the classes exist
    model = build_model(config, data)
    if tc["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    ema = make_ema(model)
    repa = build_alignment(config, model, data, acc.device)
    trained = model.parameters() if repa is None else [*model.parameters(), *repa.projector.parameters()]
    # fused: one kernel per parameter instead of ~8 small ops each (the for-loop default on CPU).
    optimizer = torch.optim.AdamW(trained, lr=float(tc["lr"]), betas=tuple(tc["betas"]),
                                  weight_decay=float(tc["weight_decay"]), fused=acc.device.type in ("cpu", "cuda"))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(int(tc["warmup_steps"])))

    step, position, last_loss = 0, (0, 0), math.nan
    if checkpoint is not None:
        state = read_trainer_state(checkpoint)
        _load_model_weights(model, checkpoint / "model", "model")
        _load_model_weights(ema, checkpoint / "ema", "EMA")
        if repa is not None:
            _load_model_weights(repa.projector, checkpoint / PROJECTOR_DIR, "REPA projector")
        step, position = int(state["step"]), (int(state["epoch"]), int(state["batch_in_epoch"]))
        if state["global_micro_batch"] != micro_batch * acc.num_processes:
            raise ConfigError(f"{checkpoint} was trained with {state['global_micro_batch']} samples per micro-batch "
                              f"over all processes; this launch gives {micro_batch * acc.num_processes}: keep "
                              f"global_batch_size / grad_accum_steps the same to resume")
        optimizer_state = load_optimizer_state(checkpoint)
        scheduler_state = load_lr_scheduler_state(checkpoint)
        rng = find_rng_state(checkpoint, acc.process_index) if state["num_processes"] == acc.num_processes else None
    if tc["compile"]:
        set_compile_cache()
        model.compile()
    if repa is None:
        model, optimizer = acc.prepare(model, optimizer)
    else:
        model, projector, optimizer = acc.prepare(model, repa.projector, optimizer)
    raw_model = acc.unwrap_model(model)
    ema.to(acc.device)

    noise_generator = torch.Generator().manual_seed(seed * 1_000_003 + acc.process_index)
    torch.manual_seed(seed * 1_000_003 + 7919 * (acc.process_index + 1))  # label dropout, per process
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{checkpoint / 'optimizer.pt'} does not fit this model's optimizer: {err}") from err
        lr_scheduler.load_state_dict(scheduler_state)
        if rng is not None:
            set_rng_state(rng, noise_generator)
        elif acc.is_main_process:
            print(f"resuming {checkpoint} with {acc.num_processes} processes instead of {state['num_processes']}: "
                  f"the data order continues exactly, the noise streams are re-seeded")

    objective, training_losses = build_objective(tc)
    writer = CheckpointWriter(acc, run_dir, int(cc["keep_last"]))
    grids = GridWriter(acc, run_dir, data.sampling_info, lc, seed) if acc.is_main_process else None
    fid = FidMonitor(acc, run_dir, data.sampling_info, lc, seed, data.dataset) if lc["fid_every"] else None
    tensorboard = None
    if acc.is_main_process and lc["tensorboard"]:
        from torch.utils.tensorboard import SummaryWriter
        # A resume from an earlier checkpoint drops the abandoned run's events after it (they are logged again).
        tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if checkpoint else None)
    batches = _micro_batches(data.dataset, micro_batch, acc, seed, *position, int(config["data"]["num_workers"]))

    total = int(tc["steps"])
    bar = tqdm(total=total, initial=step, unit="step", desc=f"training {config['model']['name']}",
               disable=not acc.is_main_process, dynamic_ncols=True)
    window_loss, window_steps, window_start = torch.zeros((), device=acc.device), 0, time.perf_counter()
    window_alignment = torch.zeros((), device=acc.device)
    grid_path = None
    clip = tc["grad_clip"]
    deadline = None if tc["time_limit_minutes"] is None else time.monotonic() + 60 * float(tc["time_limit_minutes"])
    model.train()
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=acc.device)
        step_alignment = torch.zeros((), device=acc.device)
        step_inputs = []
        for k in range(accum):
            x, y, position = next(batches)
            step_inputs.append((x, position))
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            t = objective.sample_timesteps(x.shape[0], "cpu", noise_generator).to(acc.device)
            noise = torch.randn(x.shape, generator=noise_generator).to(acc.device)
            targets = repa.targets(x) if repa is not None else None
            with acc.no_sync(model) if k < accum - 1 else nullcontext():
                loss = training_losses(model, x, t, dict(y=y), noise)["loss"].mean()
                if repa is None:
                    acc.backward(loss / accum)
                else:
                    with acc.no_sync(projector) if k < accum - 1 else nullcontext():
                        repa_term, alignment = repa.loss(projector, targets)
                        acc.backward((loss + repa_term) / accum)
                    step_alignment += alignment / accum
            step_loss += loss.detach() / accum
        if not bool(torch.isfinite(acc.reduce(step_loss + step_alignment, "sum"))):
            last = writer.latest() or checkpoint
            if tensorboard is not None:
                tensorboard.close()
            sources = _non_finite_inputs(step_inputs, data.dataset, micro_batch, acc, seed)
            if sources:
                raise ShardError(f"the training data holds NaN or infinite values (not a learning-rate problem): "
                                 f"{', '.join(sources[:5])}{f' and {len(sources) - 5} more' if len(sources) > 5 else ''}"
                                 f", read at step {step + 1}; re-extract those shards (delete them and re-run "
                                 f"extract_latents.py)")
            raise NonFiniteLossError(
                f"the loss became {step_loss.item()} at step {step + 1} (no checkpoint written for it); "
                f"last good checkpoint: {last if last else 'none (nothing was saved yet)'}. Resume from it "
                f"with a lower train.lr or train.grad_clip set.")
        clipped = model.parameters() if repa is None else [*model.parameters(), *projector.parameters()]
        grad_norm = acc.clip_grad_norm_(clipped, float(clip)) if clip else None
        optimizer.step()
        lr_scheduler.step()
        step += 1
        update_ema(ema, raw_model, ema_decay_at(step, float(tc["ema_decay"]), bool(tc["ema_warmup"])))
        window_loss += step_loss
        window_alignment += step_alignment
        window_steps += 1
        bar.update(1)
        if deadline is not None and step < total:
            out_of_time = torch.tensor(float(time.monotonic() > deadline), device=acc.device)
            if acc.reduce(out_of_time, "sum").item() > 0:  # every process stops at the same step
                bar.write(f"train.time_limit_minutes={tc['time_limit_minutes']} reached: stopping at step {step} "
                          f"of {total}; run again with --resume to continue")
                total = step

        if step % int(lc["every"]) == 0 or step == total:
            mean_loss = (acc.reduce(window_loss, "mean") / window_steps).item()
            rate = window_steps / (time.perf_counter() - window_start)
            last_loss = mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", steps_per_s=f"{rate:.2f}")
            if tensorboard is not None:
                tensorboard.add_scalar("train/loss", mean_loss, step)
                tensorboard.add_scalar("train/steps_per_sec", rate, step)
                tensorboard.add_scalar("train/lr", lr_scheduler.get_last_lr()[0], step)
                if grad_norm is not None:
                    tensorboard.add_scalar("train/grad_norm", float(grad_norm), step)
            if repa is not None:
                alignment = (acc.reduce(window_alignment, "mean") / window_steps).item()
                if tensorboard is not None:
                    tensorboard.add_scalar("train/repa_alignment", alignment, step)  # mean -cos, in [-1, 1]
            window_loss.zero_()
            window_alignment.zero_()
            window_steps, window_start = 0, time.perf_counter()

        if step % int(cc["every"]) == 0 or step == total:
            if not _finite([*raw_model.parameters(), *ema.parameters()]):
                last = writer.latest() or checkpoint
                raise NonFiniteLossError(
                    f"the weights became NaN or infinite by step {step} although the loss was finite (an overflow "
                    f"in the gradients?); no checkpoint written for it; last good checkpoint: "
                    f"{last if last else 'none (nothing was saved yet)'}. Resume from it with a lower train.lr "
                    f"or train.grad_clip set.")
            checkpoint = writer.write(step, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      sampling_info=data.sampling_info, config=config, noise_generator=noise_generator,
                                      trainer_state={"epoch": position[0], "batch_in_epoch": position[1],
                                                     "num_processes": acc.num_processes,
                                                     "global_micro_batch": micro_batch * acc.num_processes,
                                                     "grad_accum_steps": accum, "loss": last_loss},
                                      extra_weights=None if repa is None else {PROJECTOR_DIR: projector})
        sample_every = int(lc["sample_every"])
        if (sample_every and step % sample_every == 0) or step == total:
            if grids is not None:
                grid_path = grids.write(ema, step)
                if tensorboard is not None:
                    grids.log_to(tensorboard, grid_path, step)
            acc.wait_for_everyone()
        if fid is not None and fid.due(step):
            fid.evaluate(ema, step, tensorboard)
    bar.close()
    if tensorboard is not None:
        tensorboard.close()
    return TrainResult(run_dir=run_dir, checkpoint=checkpoint, step=step, loss=last_loss, grid=grid_path,
                       model=raw_model, ema=ema)
