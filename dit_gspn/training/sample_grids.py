"""Labelled sample grids drawn during training, from the EMA weights, with the project's one sampling loop."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.sampling import sample
from dit_gspn.sampling.labelled_grid import default_grid_classes, save_labelled_grid
from dit_gspn.vae import decode, load_vae

from .config import ConfigError, LoggingConfig


def grid_labels(num_classes: int, classes: list[int] | None, per_class: int) -> tuple[list[int], int]:
    """(labels, images per row): one column per class (``classes``, or ``default_grid_classes``), ``per_class``
    rows."""
    if classes is None:
        classes = default_grid_classes(num_classes)
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError(f"logging.sample_classes {bad} are outside [0, {num_classes}): the data has "
                          f"{num_classes} classes")
    return [int(c) for c in classes] * int(per_class), len(classes)


class GridWriter:
    """Writes ``<run_dir>/samples/<step:07d>.png`` on the main process; the noise is the same at every step."""

    def __init__(self, accelerator, run_dir: str | Path, info: SamplingInfo, logging: LoggingConfig, seed: int):
        self.device = accelerator.device
        self.folder = Path(run_dir) / "samples"
        self.info = info
        self.logging = logging
        self.seed = seed
        self.labels, self.nrow = grid_labels(info.num_classes, logging.sample_classes, logging.samples_per_class)
        self._vae = None
        self._vae_failed = False

    def _decoder(self):
        if self.info.vae is None or self._vae is not None:
            return self._vae
        try:
            self._vae = load_vae(self.info.vae, self.device)
        except (FileNotFoundError, OSError) as exc:
            if not self._vae_failed:
                warnings.warn(f"sample grids are off: {exc}")
            self._vae_failed = True
        return self._vae

    @torch.no_grad()
    def write(self, ema: torch.nn.Module, step: int) -> Path | None:
        if self.info.vae is not None and self._decoder() is None:
            return None
        logging = self.logging
        out = sample(ema, self.labels, sampler=logging.sampler, num_steps=logging.sample_steps,
                     cfg_scale=logging.cfg_scale, guidance_interval=logging.guidance_interval,
                     flow_shift=logging.flow_shift, generator=torch.Generator().manual_seed(self.seed),
                     clip_denoised=self.info.clip_denoised)
        images = decode(out, self.info, self._vae)
        return save_labelled_grid(images.cpu(), self.labels, self.folder / f"{step:07d}.png",
                                  class_names=self.info.class_names, nrow=self.nrow)

    @staticmethod
    def log_to(tensorboard, path: Path | None, step: int) -> None:
        if path is not None:
            tensorboard.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
