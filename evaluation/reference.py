"""python -m evaluation.reference FOLDER --image-size 256 --out ref_stats.npz [--images-npz ref_batch.npz]

The step ADM's reference batches come from, for the user's own images: every image file under FOLDER
(recursively, so ImageNet-style class folders too, any sizes), ADM's center crop at ``--image-size``, then
Inception-v3 features -> FID and sFID statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, with the Inception
weights' hash) that ``python -m evaluation SAMPLES ref_stats.npz`` takes as the reference; optionally the crops
as an ADM-style ``.npz`` (``arr_0``, uint8 N x S x S x 3). A file that does not decode is skipped, never fatal:
each is listed in ``<out>.skipped.txt`` and counted in the summary. Work is saved every ``--chunk-size`` images
in ``<out>.parts/`` (the features' moments, and the crops if asked): run the same command again after a kill and
the finished chunks are kept.

The statistics (mean, unbiased covariance: ``np.cov``'s) are accumulated in float64 as ``Moments`` per chunk and
merged, so an ImageNet-sized folder never holds its features in memory; the crops go to a chunk's raw crops file
batch by batch and from there into the ``.npz`` batch by batch, so memory holds one batch of crops, whatever the
chunk size.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_gspn.atomic_write import atomic_write, savez_atomically
from dit_gspn.cli import ArgumentParser, check_output_file, command
from dit_gspn.errors import MissingFileError, OutputExistsError
from dit_gspn.data.image_folder import UNREADABLE_IMAGE_ERRORS, adm_crop_file
from dit_gspn.image_npz import ImageNpzWriter
from dit_gspn.metrics import POOL, POOL_LAYERS, SPATIAL, EvalInput, EvalInputError, InceptionFeatures, Moments
from dit_gspn.metrics.inception import ADM_POOL_LAYER, SPATIAL_DIM
from dit_gspn.metrics.statistics import write_statistics
from dit_gspn.work_folder import check_manifest

CHUNK_KEYS = {"pool_count", "pool_mean", "pool_scatter", "spatial_count", "spatial_mean", "spatial_scatter",
              "skipped"}


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in sorted order: the same files the evaluator reads."""
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist")
    files = EvalInput(folder, "folder").files
    if not files:
        raise EvalInputError(f"{folder} holds no image files (searched recursively)")
    return files


def listing_sha256(folder: Path, files: list[Path]) -> str:
    """A hash of the folder's listing (relative paths and sizes): what a resumed run must find unchanged."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder)}\0{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk_{k:06d}.npz"


def _crops_path(chunk: Path) -> Path:
    """A chunk's crops: uint8 (n, S, S, 3) in C order, raw, its length ``n * S * S * 3`` (n: the chunk's
    ``crops``)."""
    return chunk.with_suffix(".crops")


def _chunk_done(path: Path, image_size: int | None) -> bool:
    """Whether ``path`` is a finished chunk, with its complete crops file when ``image_size`` asks for crops; a
    damaged chunk (never written by us: writes are atomic) is removed, to be done again."""
    try:
        with np.load(path) as data:
            if not CHUNK_KEYS <= set(data.files):
                return False
            if image_size is None:
                return True
            crops = int(data["crops"]) if "crops" in data.files else -1
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)
        return False
    crops_path = _crops_path(path)
    return crops_path.is_file() and crops_path.stat().st_size == crops * image_size * image_size * 3


def process_chunk(files: list[Path], path: Path, extractor: InceptionFeatures, image_size: int,
                  batch_size: int, keep_images: bool, bar) -> None:
    """Crop, featurise and summarise one chunk of files into ``path`` (the moments of its pool and spatial
    features) and, if kept, its crops into ``_crops_path(path)``, one batch at a time; unreadable files go to
    its ``skipped``. The crops file is complete before ``path`` exists."""
    pool, spatial = None, None
    skipped, count = [], 0
    with contextlib.ExitStack() as stack:
        crops = None
        if keep_images:
            crops = stack.enter_context(open(stack.enter_context(atomic_write(_crops_path(path))), "wb"))
        for start in range(0, len(files), batch_size):
            batch = []
            for file in files[start:start + batch_size]:
                try:
                    batch.append(adm_crop_file(file, image_size))
                except UNREADABLE_IMAGE_ERRORS as err:
                    skipped.append(f"{file}\t{type(err).__name__}: {err}")
                bar.update(1)
            if not batch:
                continue
            images = np.stack(batch)
            found = extractor(torch.from_numpy(images).permute(0, 3, 1, 2), wanted=(POOL, SPATIAL))
            pool, spatial = pool or Moments(found[POOL].shape[1]), spatial or Moments(found[SPATIAL].shape[1])
            pool.add(found[POOL])
            spatial.add(found[SPATIAL])
            if crops is not None:
                crops.write(memoryview(images).cast("B"))
            count += len(images)
    pool = pool or Moments(int(extractor.pool_layer))
    spatial = spatial or Moments(SPATIAL_DIM)
    named = dict(**pool.to_arrays("pool_"), **spatial.to_arrays("spatial_"), skipped=np.asarray(json.dumps(skipped)))
    if keep_images:
        named["crops"] = np.int64(count)
    savez_atomically(path, **named)


def write_images_npz(path: Path, chunk_paths: list[Path], count: int, image_size: int, batch_size: int) -> None:
    """The crops of every chunk as one ADM-layout ``.npz`` (``arr_0``), streamed: ``batch_size`` crops in memory
    at a time."""
    per_image = image_size * image_size * 3
    with ImageNpzWriter(path, count, image_size, image_size) as writer:
        for chunk in chunk_paths:
            with open(_crops_path(chunk), "rb") as crops:
                while raw := crops.read(batch_size * per_image):
                    writer.append(np.frombuffer(raw, np.uint8).reshape(-1, image_size, image_size, 3))


def build_reference(folder: str | Path, out: str | Path, image_size: int, *, weights=None,
                    images_npz: str | Path | None = None, chunk_size: int = 10_000, batch_size: int = 50,
                    device: str = "cpu", feature_layer: str = ADM_POOL_LAYER, progress: bool = True) -> dict:
    """Write ``out`` (FID and sFID statistics) and optionally ``images_npz`` from ``folder``; returns a summary
    dict (count, skipped files with reasons, reused chunks). Resumes from ``<out>.parts/``."""
    folder, out = Path(folder), Path(out)
    for target, flag in ((out, "--out"), (images_npz, "--images-npz")):
        if target is not None and Path(target).exists():
            raise OutputExistsError(f"{flag} {target} already exists: delete it or choose another path")
        if target is not None:
            check_output_file(target, flag)
    files = image_files(folder)
    extractor = InceptionFeatures(weights, device, feature_layer)
    parts = out.with_name(out.name + ".parts")
    listing = listing_sha256(folder, files)
    settings = dict(folder=str(folder.resolve()), image_size=image_size, chunk_size=chunk_size, files=len(files),
                    listing_sha256=listing, weights_sha256=extractor.sha256, images=images_npz is not None,
                    feature_layer=feature_layer)
    check_manifest(parts, settings, write=True)
    chunks = [files[i:i + chunk_size] for i in range(0, len(files), chunk_size)]
    done = [_chunk_done(_chunk_path(parts, k), image_size if images_npz is not None else None)
            for k in range(len(chunks))]
    reused = sum(done)
    with tqdm(total=len(files), initial=sum(len(c) for c, d in zip(chunks, done) if d), unit="img",
              desc="reference", disable=not progress, dynamic_ncols=True) as bar:
        for k, chunk in enumerate(chunks):
            if not done[k]:
                process_chunk(chunk, _chunk_path(parts, k), extractor, image_size, batch_size,
                              images_npz is not None, bar)
    pool, spatial, skipped = Moments(int(feature_layer)), Moments(SPATIAL_DIM), []
    for k in range(len(chunks)):
        with np.load(_chunk_path(parts, k)) as data:
            pool.merge(Moments.from_arrays(data, "pool_"))
            spatial.merge(Moments.from_arrays(data, "spatial_"))
            skipped += json.loads(str(data["skipped"]))
    if pool.count < 2:
        raise EvalInputError(f"{folder}: only {pool.count} of {len(files)} image files could be read; FID "
                             f"statistics need at least 2 images")
    write_statistics(out, pool.statistics(), spatial.statistics(), feature_extractor=extractor.name,
                     weights_sha256=extractor.sha256, count=pool.count, source_sha256=listing)
    if images_npz is not None:
        write_images_npz(Path(images_npz), [_chunk_path(parts, k) for k in range(len(chunks))], pool.count,
                         image_size, batch_size)
    skipped_list = out.with_name(out.name + ".skipped.txt")
    if skipped:
        skipped_list.write_text("\n".join(skipped) + "\n")
    shutil.rmtree(parts)
    return {"count": pool.count, "files": len(files), "skipped": skipped, "skipped_list": str(skipped_list),
            "reused_chunks": reused, "chunks": len(chunks)}


def parse_args(argv=None):
    p = ArgumentParser(module="evaluation.reference", description=__doc__)
    p.add_argument("folder", help="a folder of images, searched recursively (class folders included)")
    p.add_argument("--image-size", type=int, required=True, help="ADM's center crop to this square size (pixels)")
    p.add_argument("--out", required=True, help="the reference statistics .npz to write")
    p.add_argument("--images-npz", default=None, help="also write the crops as an ADM-style .npz (arr_0)")
    p.add_argument("--weights", default=None, help="Inception-v3 state dict (as python -m evaluation --weights)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="images per resumable chunk")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--feature-layer", choices=POOL_LAYERS, default=ADM_POOL_LAYER,
                   help="Inception features for FID (2048 = ADM's pool_3; the evaluator's --feature-layer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag in ("image_size", "chunk_size", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("out", "images_npz"):
        value = getattr(args, flag)
        if value is not None and Path(value).suffix != ".npz":
            p.error(f"--{flag.replace('_', '-')} {value}: the file is written as an .npz")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = build_reference(args.folder, args.out, args.image_size, weights=args.weights,
                              images_npz=args.images_npz, chunk_size=args.chunk_size, batch_size=args.batch_size,
                              device=args.device, feature_layer=args.feature_layer, progress=not args.quiet)
    for line in summary["skipped"][:10]:
        print(f"warning: skipped {line.replace(chr(9), ': ', 1)}", file=sys.stderr)
    more = f" (all listed in {summary['skipped_list']})" if summary["skipped"] else ""
    reused = f"; kept {summary['reused_chunks']} finished chunks" if summary["reused_chunks"] else ""
    print(f"wrote {args.out} from {summary['count']} of {summary['files']} files, skipped "
          f"{len(summary['skipped'])} unreadable{more}{reused}"
          f"{f'; crops in {args.images_npz}' if args.images_npz else ''}", flush=True)
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
