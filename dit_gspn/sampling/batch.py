"""Batch sampling for evaluation: fixed shards of sample indices, spread over processes, resumable, into an ADM .npz.

Sample ``i`` is drawn from its own generator seeded by (seed, i), and shard ``k`` always holds the indices
``[k * shard_size, (k + 1) * shard_size)`` sampled as one batch, so the result is the same for any number of
processes and after any number of kills and resumes. Shards are written atomically (a temporary file, then
``os.replace``) to ``<out>.shards/``; a resumed run keeps and skips the finished ones. The final ``.npz``
holds ``arr_0`` (uint8, N x H x W x 3, as ADM's evaluator reads it) and ``arr_1`` (int64 class labels, as
ADM's own sampler writes them).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_gspn.cli import OutputExistsError, UserError, check_output_path
from dit_gspn.seeding import index_seed

from .checkpoint import SamplingInfo, decode
from .grid import to_uint8
from .provenance import provenance_path, write_provenance
from .sampler import sample

CLASS_MODES = ("uniform", "balanced")
MANIFEST = "run.json"
#: Settings added after the manifest's first version, with the value that means what their absence meant.
MANIFEST_DEFAULTS = {"guidance_interval": None, "flow_shift": 1.0}


class BatchError(UserError, ValueError):
    """A batch-sampling job that cannot continue as asked (shards drawn with other settings, ...)."""


def index_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per sample index (CPU, so the same noise on any device)."""
    return [torch.Generator().manual_seed(index_seed(seed, int(i))) for i in indices]


def class_labels(num_samples: int, num_classes: int, mode: str = "uniform", seed: int = 0) -> np.ndarray:
    """The class of every sample index: ``uniform`` i.i.d. draws, or ``balanced`` (each class N // K or
    N // K + 1 times, in a seeded random order so every shard holds a mix)."""
    rng = np.random.default_rng(seed)
    if mode == "uniform":
        return rng.integers(0, num_classes, num_samples, dtype=np.int64)
    if mode == "balanced":
        return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    raise ValueError(f"unknown class mode {mode!r}; choose one of {CLASS_MODES}")


def write_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Atomically write ADM's sample layout: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels (if any)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(path, *arrays)
    return path


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels or None) from an ADM-layout ``.npz``."""
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 (keys: {data.files}); ADM's layout keeps the images in arr_0")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images, labels


def atomic_savez(path: Path, *arrays, **named) -> None:
    """``np.savez`` to ``path`` through a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, *arrays, **named)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples to draw and how they are cut into shards; everything a resume must agree on."""

    num_samples: int
    num_classes: int
    shard_size: int = 32
    class_mode: str = "uniform"
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {self.num_samples}, {self.shard_size}")
        if self.class_mode not in CLASS_MODES:
            raise ValueError(f"unknown class mode {self.class_mode!r}; choose one of {CLASS_MODES}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_indices(self, shard: int) -> np.ndarray:
        return np.arange(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        """The shards process ``rank`` of ``world_size`` draws (round robin: every shard exactly once)."""
        return list(range(rank, self.num_shards, world_size))

    def labels(self) -> np.ndarray:
        return class_labels(self.num_samples, self.num_classes, self.class_mode, self.seed)


def shard_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"shard_{shard:06d}.npz"


def _shard_done(path: Path, expected: np.ndarray) -> bool:
    """Whether ``path`` is a finished shard of these indices; a damaged one (truncated, empty, not an npz:
    no run of ours writes those, writes are atomic) is said so, removed, and drawn again."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            if np.array_equal(data["indices"], expected) and len(data["images"]) == len(expected):
                return True
            why = "it holds other sample indices"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        why = f"it cannot be read ({type(err).__name__}: {err})"
    print(f"warning: shard {path} is drawn again: {why}", file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return False


def check_batch_output(out: str | Path) -> None:
    """Refuse an ``out`` (or its provenance file) that exists, as it would be overwritten, before any sampling."""
    out = Path(out)
    for path in (out, provenance_path(out)):
        if path.exists():
            raise OutputExistsError(f"{path} already exists: delete it or choose another --out")
    check_output_path(out)


def check_manifest(shard_dir: Path, settings: dict, write: bool) -> None:
    """Refuse to mix shards drawn with other settings; ``write`` (main process) records them on first use."""
    path = shard_dir / MANIFEST
    if path.is_file():
        try:
            old = {**MANIFEST_DEFAULTS, **json.loads(path.read_text())}
        except json.JSONDecodeError as err:
            raise BatchError(f"{path} is not valid JSON ({err}); delete {shard_dir} to start the batch over") from err
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise BatchError(f"{shard_dir} holds shards drawn with other settings ({detail}); delete that "
                             f"folder or choose another --out")
    elif write:
        shard_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _images_done(plan: BatchPlan, shard_dir: Path) -> int:
    done = {int(p.stem.split("_")[1]) for p in shard_dir.glob("shard_*.npz") if p.stem.split("_")[1].isdigit()}
    return sum(len(plan.shard_indices(k)) for k in done if k < plan.num_shards)


def sample_shards(model, plan: BatchPlan, shard_dir: Path, *, info: SamplingInfo, vae=None, rank: int = 0,
                  world_size: int = 1, size=None, bf16: bool = False, decode_batch_size: int = 32,
                  progress: bool = True, **sample_kwargs) -> list[int]:
    """Draw this process's unfinished shards into ``shard_dir``; returns the shards it drew.

    ``sample_kwargs`` go to :func:`sample` (sampler, num_steps, cfg_scale, guided_channels). The progress bar
    (main process) counts the images of all processes' finished shards, so its rate is the total images/s.
    """
    labels = plan.labels()
    shard_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    todo = [k for k in plan.shards_of(rank, world_size)
            if not _shard_done(shard_path(shard_dir, k), plan.shard_indices(k))]
    bar = tqdm(total=plan.num_samples, initial=_images_done(plan, shard_dir), unit="img", desc="sampling",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    for k in todo:
        indices = plan.shard_indices(k)
        with autocast:
            out = sample(model, torch.as_tensor(labels[indices], device=device), generator=index_generators(
                plan.seed, indices), size=size, **sample_kwargs)
            images = to_uint8(decode(out, info, vae, decode_batch_size))
        atomic_savez(shard_path(shard_dir, k), images=images, labels=labels[indices], indices=indices,
                      rank=np.int64(rank))
        bar.update(_images_done(plan, shard_dir) - bar.n)
    bar.close()
    return todo


def assemble(plan: BatchPlan, shard_dir: Path, out: str | Path) -> Path:
    """Join the shards into ``out`` (ADM layout), after checking every index 0..N-1 is there exactly once."""
    images, labels, indices = [], [], []
    for k in range(plan.num_shards):
        path = shard_path(shard_dir, k)
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} is missing: run the same command again to draw it")
        with np.load(path) as data:
            images.append(data["images"])
            labels.append(data["labels"])
            indices.append(data["indices"])
    indices = np.concatenate(indices)
    if not np.array_equal(indices, np.arange(plan.num_samples)):
        raise ValueError(f"shards in {shard_dir} do not hold the indices 0..{plan.num_samples - 1} once each")
    labels = np.concatenate(labels)
    if not np.array_equal(labels, plan.labels()):
        raise ValueError(f"shards in {shard_dir} hold other class labels than this run's plan")
    return write_npz(out, np.concatenate(images), labels)


def run_batch(model, plan: BatchPlan, out: str | Path, *, info: SamplingInfo, settings: dict, vae=None,
              rank: int = 0, world_size: int = 1, barrier=lambda: None, keep_shards: bool = False,
              **kwargs) -> Path | None:
    """The whole batch job for one process: check/record settings, draw shards, and (main process) assemble
    them into ``out`` with its provenance file (``settings``, the plan, versions; see ``provenance``).

    ``barrier`` waits for all processes (e.g. ``PartialState().wait_for_everyone``). Returns the ``.npz`` path
    on the main process, None elsewhere.
    """
    shard_dir = shard_dir_for(out)
    check_batch_output(out)
    settings = dict(settings, **asdict(plan))
    check_manifest(shard_dir, settings, write=rank == 0)
    barrier()
    start = time.perf_counter()
    drawn = sample_shards(model, plan, shard_dir, info=info, vae=vae, rank=rank, world_size=world_size,
                          progress=rank == 0, **kwargs)
    elapsed = time.perf_counter() - start
    barrier()
    if rank != 0:
        return None
    path = assemble(plan, shard_dir, out)
    write_provenance(path, settings, plan.num_samples)
    skipped = len(plan.shards_of(0, world_size)) - len(drawn)
    print(f"wrote {path} ({plan.num_samples} samples; this process drew {len(drawn)} shards in {elapsed:.1f} s"
          f"{f', skipped {skipped} finished ones' if skipped else ''})", flush=True)
    if not keep_shards:
        shutil.rmtree(shard_dir)
    return path
