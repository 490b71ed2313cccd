"""Batch sampling for evaluation: fixed shards of sample indices, spread over processes, resumable, into an ADM .npz.

Sample ``i`` is drawn from its own generator seeded by (seed, i), and shard ``k`` always holds the indices
``[k * shard_size, (k + 1) * shard_size)`` sampled as one batch, so the result is the same for any number of
processes and after any number of kills and resumes. Shards are written atomically (``dit_gspn.atomic_write``)
to ``<out>.shards/``; a resumed run keeps and skips the finished ones. The final ``.npz`` holds ``arr_0``
(uint8, N x H x W x 3, as ADM's evaluator reads it) and ``arr_1`` (int64 class labels, as ADM's own sampler
writes them); it is streamed from the shards one at a time (``ImageNpzWriter``), so no process ever holds more
than a shard of images, and it is byte for byte the same file whatever the history of kills and resumes.

While a job runs, its main process holds ``<out>.shards/``'s lock: a second job on the same ``--out`` is
refused with the first one's process id, and a killed job's lock dies with it. A job killed after its ``.npz``
but before its provenance file is finished by the same command; so is one whose output was deleted.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_gspn.atomic_write import savez_atomically
from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.cli import check_output_file
from dit_gspn.errors import OutputExistsError, UserError
from dit_gspn.image_npz import ImageNpzWriter, read_header, to_uint8
from dit_gspn.seeding import index_seed
from dit_gspn.vae import decode
from dit_gspn.folder_lock import holding
from dit_gspn.work_folder import MANIFEST, check_manifest

from .provenance import provenance_path, write_provenance
from .sampler import sample

CLASS_MODES = ("uniform", "balanced")
#: Settings added after the manifest's first version, with the value that means what their absence meant.
MANIFEST_DEFAULTS = {"guidance_interval": None, "flow_shift": 1.0}


class BatchError(UserError, ValueError):
    """A batch-sampling job that cannot continue as asked (a missing shard, shards of another plan, ...)."""


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
    """Whether ``path`` is a finished shard of these indices (its images' header read, not the images); a damaged
    one (truncated, empty, not an npz: no run of ours writes those, writes are atomic) is said so, removed, and
    drawn again."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            indices = data["indices"]
        if np.array_equal(indices, expected) and read_header(path, "images")[0] == len(expected):
            return True
        why = "it holds other sample indices"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        why = f"it cannot be read ({type(err).__name__}: {err})"
    print(f"warning: shard {path} is drawn again: {why}", file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return False


def check_batch_output(out: str | Path) -> None:
    """Refuse, before any sampling, an ``out`` that the job would overwrite or cannot write.

    ``out`` with its provenance file is a finished job's; ``out`` without one and without this job's shard folder
    is not this job's file: both are refused. ``out`` without its provenance file beside its shard folder is a job
    killed after writing it, which the same command finishes (``check_manifest`` refuses other settings); a
    provenance file without ``out`` describes nothing any more and is replaced.
    """
    out = Path(out)
    check_output_file(out, "--out")
    if not out.exists():
        return
    if provenance_path(out).exists():
        raise OutputExistsError(f"{out} already exists (with {provenance_path(out).name}): delete it or choose "
                                f"another --out")
    if not (shard_dir_for(out) / MANIFEST).is_file():
        raise OutputExistsError(f"{out} already exists and is not an unfinished batch of this command (there is no "
                                f"{shard_dir_for(out)}): delete it or choose another --out")


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
    with tqdm(total=plan.num_samples, initial=_images_done(plan, shard_dir), unit="img", desc="sampling",
              disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:  # closed (a newline) on errors too
        for k in todo:
            indices = plan.shard_indices(k)
            with autocast:
                out = sample(model, torch.as_tensor(labels[indices], device=device), generator=index_generators(
                    plan.seed, indices), size=size, **sample_kwargs)
                images = to_uint8(decode(out, info, vae, decode_batch_size))
            savez_atomically(shard_path(shard_dir, k), images=images, labels=labels[indices], indices=indices,
                             rank=np.int64(rank))  # a full disk: DiskFullError, the finished shards kept
            bar.update(_images_done(plan, shard_dir) - bar.n)
    return todo


def assemble(plan: BatchPlan, shard_dir: Path, out: str | Path) -> Path:
    """Join the shards into ``out`` (ADM's layout), after checking that they hold every index 0..N-1 once with
    this plan's labels. The file is streamed one shard at a time through ``atomic_write``'s temporary sibling of
    ``out`` (which ``run_batch`` removes when a killed assembly left it) and renamed to ``out`` when complete."""
    out, labels = Path(out), plan.labels()
    paths = [shard_path(shard_dir, k) for k in range(plan.num_shards)]
    for k, path in enumerate(paths):
        if not path.is_file():
            raise BatchError(f"shard {path} is missing: run the same command again to draw it")
        with np.load(path) as data:  # reads these two small arrays only
            if not np.array_equal(data["indices"], plan.shard_indices(k)):
                raise BatchError(f"shard {path} holds other sample indices than shard {k} of this plan; delete it "
                                 f"and run the same command again")
            if not np.array_equal(data["labels"], labels[plan.shard_indices(k)]):
                raise BatchError(f"shard {path} holds other class labels than this run's plan; delete it and run "
                                 f"the same command again")
    height, width = read_header(paths[0], "images")[1:3]
    with ImageNpzWriter(out, plan.num_samples, height, width) as writer:
        for path in paths:
            with np.load(path) as data:
                writer.append(data["images"], data["labels"])
    return out


def _remove_killed_writers_files(out: Path) -> None:
    """Remove what a killed writer of ``out`` left beside it (``atomic_write``'s ``.<name>.tmp<pid>``), which only
    the holder of ``out``'s lock may do: no other process of this job can be writing them."""
    for stale in out.parent.glob(f".{out.name}.tmp*"):
        print(f"note: removing {stale}, left by a killed run", file=sys.stderr, flush=True)
        stale.unlink(missing_ok=True)


def run_batch(model, plan: BatchPlan, out: str | Path, *, info: SamplingInfo, settings: dict, vae=None,
              rank: int = 0, world_size: int = 1, barrier=lambda: None, keep_shards: bool = False,
              **kwargs) -> Path | None:
    """The whole batch job for one process: check/record settings, draw shards, and (main process) assemble
    them into ``out`` with its provenance file (``settings``, the plan, versions; see ``provenance``).

    ``barrier`` waits for all processes (e.g. ``PartialState().wait_for_everyone``). The main process holds the
    shard folder's lock throughout (another job on the same ``out`` is refused). Returns the ``.npz`` path on the
    main process, None elsewhere.
    """
    out = Path(out)
    shard_dir = shard_dir_for(out)
    check_batch_output(out)
    settings = dict(settings, **asdict(plan))
    with holding(shard_dir, f"sampling into --out {out}") if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            check_batch_output(out)  # again: a job that held the lock until now may have finished this out
            _remove_killed_writers_files(out)
            if not out.exists() and provenance_path(out).exists():
                print(f"note: {provenance_path(out)} describes no {out.name} any more; it will be replaced",
                      file=sys.stderr, flush=True)
        check_manifest(shard_dir, settings, write=rank == 0, defaults=MANIFEST_DEFAULTS)
        barrier()
        start = time.perf_counter()
        drawn = sample_shards(model, plan, shard_dir, info=info, vae=vae, rank=rank, world_size=world_size,
                              progress=rank == 0, **kwargs)
        elapsed = time.perf_counter() - start
        barrier()
        if rank != 0:
            return None
        path = assemble(plan, shard_dir, out)  # both written atomically: a full disk keeps the shards
        write_provenance(path, settings, plan.num_samples)
        skipped = len(plan.shards_of(0, world_size)) - len(drawn)
        print(f"wrote {path} ({plan.num_samples} samples; this process drew {len(drawn)} shards in {elapsed:.1f} s"
              f"{f', skipped {skipped} finished ones' if skipped else ''})", flush=True)
        if not keep_shards:
            shutil.rmtree(shard_dir)
    return path
