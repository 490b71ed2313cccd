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
from pathlib import Path

import torch

from dit_gspn.checkpoint import CheckpointWriter
from dit_gspn.errors import UserError
from dit_gspn.data import ShardError
from dit_gspn.folder_lock import release_folder
from dit_gspn.host_memory import retain_freed_host_memory
from dit_gspn.seeding import Stream, index_generator, index_seed

from .config import ConfigError, RunConfig, TrainConfig, parse_config
from .data_order import micro_batches, non_finite_sources
from .datasets import TrainingData, build_training_data
from .ema import ema_decay_at, make_ema, update_ema
from .fid_monitor import FidMonitor
from .sample_grids import GridWriter, grid_labels
from .progress import TrainingLog
from .repa import PROJECTOR_DIR, RepresentationAlignment
from .resume import SEEDING, load_model_weights, open_run_folder, read_checkpoint, resume_command


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


def build_model(config: RunConfig, data: TrainingData):
    """The zoo model ``config.model.name`` with the data's channels, size and classes filled in; a ConfigError
    naming the model's settings when they do not fit its class (build it on the meta device to check them
    without memory or initialisation cost)."""
    from dit_gspn.models import create_model

    kwargs = {**config.model.options, "in_channels": data.in_channels, "input_size": data.input_size,
              "num_classes": data.num_classes}
    try:
        return create_model(config.model.name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {config.model.name}: {exc} (for the data's {data.input_size} maps of "
                          f"{data.in_channels} channels and {data.num_classes} classes)") from exc


def build_alignment(config: RunConfig, model: torch.nn.Module, data: TrainingData,
                    device) -> RepresentationAlignment | None:
    """The REPA term ``config.repa`` asks for (its encoder loaded, its projector fresh), or None when off."""
    from .encoders import load_encoder

    rc = config.repa
    if rc.block is None:
        return None
    try:
        return RepresentationAlignment(model, load_encoder(rc.encoder), block=rc.block, coefficient=rc.coefficient,
                                       projector_dim=rc.projector_dim, info=data.sampling_info, device=device)
    except ValueError as err:
        raise ConfigError(f"repa: {err}") from err


def lr_factor(train: TrainConfig):
    """The factor of ``train.lr`` after ``step`` optimizer steps (what LambdaLR multiplies it by): a linear
    warm-up over ``warmup_steps``, then 1 (constant) or a cosine down to ``min_lr / lr`` at ``lr_decay_steps``
    (default ``steps``); held for blocks of ``lr_update_every`` steps, each at the value of its first step with the
    warm-up counted to the block's end (so that no block trains at 0)."""
    warmup, every = train.warmup_steps, train.lr_update_every
    decay_end = train.lr_decay_steps or train.steps
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        start = step - step % every
        if start < warmup:
            return min(1.0, (start + every) / warmup)
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (start - warmup) / max(1, decay_end - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def set_compile_cache() -> Path:
    """Point torch.compile's cache at ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``~/.cache/dit_gspn/inductor``
    (not a temp folder that is recompiled into every run); returns it."""
    default = Path.home() / ".cache" / "dit_gspn" / "inductor"
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))


def _finite(tensors) -> bool:
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def _check_fits_dataset(data: TrainingData, micro_batch: int, num_processes: int, config: RunConfig) -> None:
    if len(data.dataset) < micro_batch * num_processes:
        tc = config.train
        raise ConfigError(f"train.global_batch_size={tc.global_batch_size} / train.grad_accum_steps="
                          f"{tc.grad_accum_steps} gives {micro_batch * num_processes} samples per micro-batch, "
                          f"but the dataset holds only {len(data.dataset)}: lower the batch size or use more data")


def _accelerator(train_config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    try:
        return Accelerator(mixed_precision=train_config.mixed_precision, cpu=train_config.cpu,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    except ValueError as err:  # accelerate's word on a precision the device cannot do (fp16 on a CPU, ...)
        raise ConfigError(f"train.mixed_precision={train_config.mixed_precision} with train.cpu="
                          f"{train_config.cpu}: {err}") from err


def _micro_batch_size(train_config, num_processes: int) -> int:
    """Samples per process and micro-batch: global_batch_size / (processes x grad_accum_steps), exactly."""
    per_step = num_processes * train_config.grad_accum_steps
    if train_config.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train_config.global_batch_size} must be divisible by "
                          f"processes x grad_accum_steps = {num_processes} x {train_config.grad_accum_steps}")
    return train_config.global_batch_size // per_step


class Trainer:
    """One training run on this process: built (and restored) by the constructor, trained by ``run``.

    The parts read in the order they run: the data and every check (in the constructor), ``_build`` (model,
    EMA, optimizer), the restore of a checkpoint (``resume.read_checkpoint`` before ``accelerate.prepare``,
    ``Restored.apply`` after the streams are seeded), then per optimizer step ``_step`` (micro-batches, loss,
    update, EMA), the time limit, ``TrainingLog.report``, ``_save`` (a checkpoint) and ``_draw_grid``.
    """

    def __init__(self, config: RunConfig, resume: str | None = None, allow_config_change: bool = False):
        retain_freed_host_memory()  # CPU steps reuse their activations' pages instead of faulting them in anew
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.acc = acc = _accelerator(config.train)
        self.accum = config.train.grad_accum_steps
        self.micro_batch = _micro_batch_size(config.train, acc.num_processes)
        # Everything the data decides is checked before the run folder is made.
        self.data = build_training_data(config)
        _check_fits_dataset(self.data, self.micro_batch, acc.num_processes, config)
        grid_labels(self.data.num_classes, config.logging.sample_classes, config.logging.samples_per_class)
        if config.logging.fid_every:
            FidMonitor.check(config.logging, self.data)
        with torch.device("meta"):
            build_model(config, self.data)  # every model setting checked, no memory allocated
        self.checkpoint = open_run_folder(config, resume, allow_config_change, acc)
        self._build()
        restored = None
        if self.checkpoint is not None:
            restored = read_checkpoint(self.checkpoint, self.model, self.ema, self.micro_batch * acc.num_processes,
                                       acc)
            if self.repa is not None:
                load_model_weights(self.repa.projector, self.checkpoint / PROJECTOR_DIR, "REPA projector")
        if config.train.compile:
            set_compile_cache()
            self.model.compile()
        if self.repa is None:
            self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        else:
            self.model, self.projector, self.optimizer = acc.prepare(self.model, self.repa.projector, self.optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.ema.to(acc.device)
        self._seed_streams()
        self.step, self.position = 0, (0, 0)
        if restored is not None:
            restored.apply(self.optimizer, self.lr_scheduler, self.noise_generator, acc)
            self.step, self.position = restored.step, restored.position
        self.objective = config.objective
        self.writer = CheckpointWriter(acc, self.run_dir, config.checkpoint.keep_last)
        self.grids = (GridWriter(acc, self.run_dir, self.data.sampling_info, config.logging, config.seed)
                      if acc.is_main_process else None)
        self.grid_path = None
        self.fid = FidMonitor(acc, self.run_dir, self.data, config.logging, config.seed) if config.logging.fid_every \
            else None
        self.window_alignment = torch.zeros((), device=acc.device)  # REPA's mean -cos since the last report

    def _build(self) -> None:
        """The model, its EMA, the optimizer and the learning-rate schedule; the same initial weights on every
        process."""
        config, acc = self.config, self.acc
        tc = config.train
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data)
        if tc.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.ema = make_ema(self.model)
        self.repa = build_alignment(config, self.model, self.data, acc.device)
        trained = (self.model.parameters() if self.repa is None
                   else [*self.model.parameters(), *self.repa.projector.parameters()])
        # fused: one kernel per parameter instead of ~8 small ops each (the for-loop default on CPU).
        self.optimizer = torch.optim.AdamW(trained, lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay, fused=acc.device.type in ("cpu", "cuda"))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(tc))

    def _seed_streams(self) -> None:
        """This process's noise generator (timesteps and noise) and global RNG (label dropout)."""
        seed, rank = self.config.seed, self.acc.process_index
        self.noise_generator = index_generator(seed, rank, stream=Stream.NOISE)
        torch.manual_seed(index_seed(seed, rank, stream=Stream.LABEL_DROPOUT))

    def run(self) -> TrainResult:
        """Train until ``train.steps`` (or the time limit), logging, checkpointing and drawing grids on the way."""
        config, acc = self.config, self.acc
        total = config.train.steps
        log = TrainingLog(acc, self.run_dir, total=total, step=self.step, every=config.logging.every,
                          tensorboard=config.logging.tensorboard, model_name=config.model.name,
                          resumed=self.checkpoint is not None)
        batches = micro_batches(self.data.dataset, self.micro_batch, acc, config.seed, *self.position,
                                 config.data.num_workers)
        deadline = (None if config.train.time_limit_minutes is None
                    else time.monotonic() + 60 * config.train.time_limit_minutes)
        self.model.train()
        try:
            while self.step < total:
                step_loss, grad_norm = self._step(batches)
                log.step_done(step_loss)
                out_of_time = deadline is not None and self.step < total and self._out_of_time(deadline)
                if out_of_time:
                    total = self.step
                if self.step % config.logging.every == 0 or self.step == total:
                    if self.repa is not None:
                        self._report_alignment(log)
                    log.report(self.step, self.lr_scheduler.get_last_lr()[0], grad_norm)
                if self.step % config.checkpoint.every == 0 or self.step == total:
                    self._save(log.last_loss)
                if out_of_time:  # named once its checkpoint is written
                    log.write(f"train.time_limit_minutes={config.train.time_limit_minutes:g} reached: stopping at "
                              f"step {self.step} of {config.train.steps}; continue with "
                              f"{resume_command(self.checkpoint, lift_time_limit=True)}")
                sample_every = config.logging.sample_every
                if (sample_every and self.step % sample_every == 0) or self.step == total:
                    self._draw_grid(log)
                if self.fid is not None and self.fid.due(self.step):
                    entry = self.fid.evaluate(self.ema, self.step, log.tensorboard)
                    if entry is not None:
                        log.write(self.fid.describe(entry))
        finally:
            log.close()
        return TrainResult(run_dir=self.run_dir, checkpoint=self.checkpoint, step=self.step, loss=log.last_loss,
                           grid=self.grid_path, model=self.raw_model, ema=self.ema)

    def _step(self, batches) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over ``grad_accum_steps`` micro-batches, then the EMA update; returns (this
        process's mean loss, the gradient norm if clipped). Raises on a non-finite loss, before the update."""
        acc, model, tc = self.acc, self.model, self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=acc.device)
        step_alignment = torch.zeros((), device=acc.device)
        step_inputs = []
        for k in range(self.accum):
            x, y, self.position = next(batches)
            step_inputs.append((x, self.position))
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
            t = self.objective.sample_timesteps(x.shape[0], self.noise_generator).to(acc.device)
            noise = torch.randn(x.shape, generator=self.noise_generator).to(acc.device)
            targets = self.repa.targets(x) if self.repa is not None else None
            with acc.no_sync(model) if k < self.accum - 1 else nullcontext():
                loss = self.objective.losses(model, x, t, dict(y=y), noise)["loss"].mean()
                if self.repa is None:
                    acc.backward(loss / self.accum)
                else:
                    with acc.no_sync(self.projector) if k < self.accum - 1 else nullcontext():
                        repa_term, alignment = self.repa.loss(self.projector, targets)
                        acc.backward((loss + repa_term) / self.accum)
                    step_alignment += alignment / self.accum
            step_loss += loss.detach() / self.accum
        if not bool(torch.isfinite(acc.reduce(step_loss + step_alignment, "sum"))):
            self._stop_on_non_finite_loss(step_loss, step_inputs)
        self.window_alignment += step_alignment
        clipped = model.parameters() if self.repa is None else [*model.parameters(), *self.projector.parameters()]
        grad_norm = acc.clip_grad_norm_(clipped, tc.grad_clip) if tc.grad_clip else None
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        update_ema(self.ema, self.raw_model, ema_decay_at(self.step, tc.ema_decay, tc.ema_warmup))
        return step_loss, grad_norm

    def _report_alignment(self, log: TrainingLog) -> None:
        """REPA's mean alignment (-cos, in [-1, 1]) over the window to TensorBoard, ``train/repa_alignment``."""
        alignment = (self.acc.reduce(self.window_alignment, "mean") / log.window_steps).item()
        if log.tensorboard is not None:
            log.tensorboard.add_scalar("train/repa_alignment", alignment, self.step)
        self.window_alignment.zero_()

    def _out_of_time(self, deadline: float) -> bool:
        """Whether any process is past ``deadline``: every process stops at the same step."""
        out_of_time = torch.tensor(float(time.monotonic() > deadline), device=self.acc.device)
        return self.acc.reduce(out_of_time, "sum").item() > 0

    def _last_good_checkpoint(self) -> str:
        last = self.writer.latest() or self.checkpoint
        return str(last) if last else "none (nothing was saved yet)"

    def _stop_on_non_finite_loss(self, step_loss: torch.Tensor, step_inputs) -> None:
        """Raise a ShardError naming the dataset rows if the data holds the NaN, else a NonFiniteLossError."""
        sources = non_finite_sources(step_inputs, self.data.dataset, self.micro_batch, self.acc, self.config.seed)
        if sources:
            raise ShardError(f"the training data holds NaN or infinite values (not a learning-rate problem): "
                             f"{', '.join(sources[:5])}{f' and {len(sources) - 5} more' if len(sources) > 5 else ''}"
                             f", read at step {self.step + 1}; re-extract those shards (delete them and re-run "
                             f"extract_latents.py)")
        raise NonFiniteLossError(
            f"the loss became {step_loss.item()} at step {self.step + 1} (no checkpoint written for it); "
            f"last good checkpoint: {self._last_good_checkpoint()}. Resume from it "
            f"with a lower train.lr or train.grad_clip set.")

    def _save(self, last_loss: float) -> None:
        """A checkpoint of this step (every process takes part), unless the weights are no longer finite."""
        acc = self.acc
        if not _finite([*self.raw_model.parameters(), *self.ema.parameters()]):
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {self.step} although the loss was finite (an overflow "
                f"in the gradients?); no checkpoint written for it; last good checkpoint: "
                f"{self._last_good_checkpoint()}. Resume from it with a lower train.lr or train.grad_clip set.")
        self.checkpoint = self.writer.write(
            self.step, model=self.model, ema=self.ema, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            sampling_info=self.data.sampling_info, config=self.config.to_dict(), noise_generator=self.noise_generator,
            trainer_state={"epoch": self.position[0], "batch_in_epoch": self.position[1],
                           "num_processes": acc.num_processes,
                           "global_micro_batch": self.micro_batch * acc.num_processes,
                           "grad_accum_steps": self.accum, "loss": last_loss, "seeding": SEEDING},
            extra_weights=None if self.repa is None else {PROJECTOR_DIR: self.projector})

    def _draw_grid(self, log: TrainingLog) -> None:
        """A labelled grid from the EMA weights (main process), logged to TensorBoard; the others wait."""
        if self.grids is not None:
            self.grid_path = self.grids.write(self.ema, self.step)
            if log.tensorboard is not None:
                self.grids.log_to(log.tensorboard, self.grid_path, self.step)
        self.acc.wait_for_everyone()


def train(config: dict | RunConfig, resume: str | None = None, allow_config_change: bool = False) -> TrainResult:
    """Run (or continue) the training run that ``config`` describes; see ``configs/*.yaml`` for the keys.

    ``resume``: None (fresh start; an existing run directory with checkpoints is an error),
    "latest" (continue from the newest complete checkpoint, or start fresh if there is none), or a
    checkpoint directory, whose saved config must match ``config`` in every key that changes the run's
    arithmetic unless ``allow_config_change``. The whole config, the data and the run folder are checked
    before the model is built. Raises ``NonFiniteLossError`` naming the step and the last good checkpoint
    (``ShardError`` naming the shard rows when the data holds the NaN).
    """
    config = parse_config(config)
    try:
        return Trainer(config, resume, allow_config_change).run()
    finally:
        release_folder(config.run_dir)  # taken by open_run_folder; held while the run lasts
