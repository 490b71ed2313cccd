"""What a run reports while it trains: the progress bar and, every ``logging.every`` steps, the mean loss over
the window since the last report (reduced over processes), the step rate, the learning rate and the gradient
norm, to the bar and TensorBoard."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


class TrainingLog:
    """The bar and the TensorBoard writer of one run (TensorBoard on the main process only, if asked for)."""

    def __init__(self, acc, run_dir: Path, *, total: int, step: int, every: int, tensorboard: bool,
                 model_name: str, resumed: bool):
        self.acc = acc
        self.every = every
        self.bar = tqdm(total=total, initial=step, unit="step", desc=f"training {model_name}",
                        disable=not acc.is_main_process, dynamic_ncols=True)
        self.tensorboard = None
        if acc.is_main_process and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # A resume from an earlier checkpoint drops the abandoned run's events after it (they are logged again).
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resumed else None)
        self.window_loss = torch.zeros((), device=acc.device)
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.last_loss = math.nan  # the mean loss of the last window reported

    def step_done(self, step_loss: torch.Tensor) -> None:
        """Count one optimizer step and its (process-local) loss into the window."""
        self.window_loss += step_loss
        self.window_steps += 1
        self.bar.update(1)

    def report(self, step: int, lr: float, grad_norm) -> None:
        """Every process calls it at the same steps (the loss is reduced over them); it resets the window."""
        mean_loss = (self.acc.reduce(self.window_loss, "mean") / self.window_steps).item()
        rate = self.window_steps / (time.perf_counter() - self.window_start)
        self.last_loss = mean_loss
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", steps_per_s=f"{rate:.2f}")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", mean_loss, step)
            self.tensorboard.add_scalar("train/steps_per_sec", rate, step)
            self.tensorboard.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                self.tensorboard.add_scalar("train/grad_norm", float(grad_norm), step)
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
