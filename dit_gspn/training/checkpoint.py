"""Training checkpoints: one directory per step, written atomically, the last K kept.

``<run_dir>/checkpoints/<step:07d>/`` holds::

    model/, ema/          DiT.save_pretrained (config.json + safetensors), read by sample.py
    sampling.json         how samples become images (dit_gspn.sampling.checkpoint.SamplingInfo)
    config.yaml           the resolved training config
    optimizer.pt          AdamW state; lr_scheduler.pt
    trainer_state.json    step, data position (epoch, micro-batch), batch sizes, last loss
    rng/rank<r>.pt        every process's RNG states (python, numpy, torch, CUDA, the noise generator)

All processes write into ``.tmp-<step>/``; after a barrier the main process renames it to
``<step:07d>/``. A directory without ``trainer_state.json`` (written last) is never taken for a
checkpoint, so a run killed mid-write leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

STATE_FILE = "trainer_state.json"


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
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE}); "
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


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``save_pretrained`` folder (all its safetensors files)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class CheckpointWriter:
    """Writes checkpoints for one run; every process calls ``write`` (it holds the barriers)."""

    def __init__(self, accelerator, run_dir: str | os.PathLike, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.accelerator = accelerator
        self.root = checkpoint_root(run_dir)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def write(self, step: int, *, model, ema, optimizer, lr_scheduler, sampling_info, config: dict,
              trainer_state: dict, noise_generator: torch.Generator) -> Path:
        from .config import dump_config

        acc = self.accelerator
        final = self.root / f"{step:07d}"
        tmp = self.root / f".tmp-{step:07d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed while writing
            (tmp / "rng").mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(noise_generator), tmp / "rng" / f"rank{acc.process_index}.pt")
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(tmp / "model")
            ema.save_pretrained(tmp / "ema")
            sampling_info.write(tmp / "sampling.json")
            dump_config(config, tmp / "config.yaml")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            # Written last: its presence marks the checkpoint complete.
            (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # the same step written again after a resume: the new one replaces it
                old = self.root / f".old-{step:07d}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            for stale in list_checkpoints(self.root.parent)[:-self.keep_last]:
                shutil.rmtree(stale)
        acc.wait_for_everyone()
        return final


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
