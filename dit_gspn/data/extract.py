"""Encode an ImageNet-style folder into sharded VAE latents, once, on one or many devices.

Shard k always covers source files [k * shard_size, (k + 1) * shard_size) of the sorted file list,
and process r of R encodes the shards with k % R == r, so a re-run (after a crash, or with a
different number of GPUs) skips every complete shard and redoes only the missing ones.

A re-run continues the same dataset or refuses: ``dataset.json`` records the class names and each
class's files (a count and a hash), and each shard records the hash of the files it covers, so a
class folder added, removed or changed since the first run is named instead of mislabelling the kept
shards.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dit_gspn.sampling.checkpoint import DEFAULT_VAE, LATENT_SCALE, load_vae, vae_scale_factor
from dit_gspn.seeding import Stream, index_generator

from .image_folder import ClassFolderImages, collate_skipping_corrupt
from .latent_shards import (ShardError, check_shard_file, read_index, read_shard_metadata, shard_name,
                            write_index, write_shard)


def _load_encoder(vae: str, device):
    """The AutoencoderKL (hub name or local folder), frozen, on ``device``."""
    return load_vae(vae).to(device).requires_grad_(False)


DATASET_FILE = "dataset.json"


def _files_sha256(root: Path, files: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for path, label in files:
        digest.update(f"{os.path.relpath(path, root)}\0{label}\n".encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset: ClassFolderImages) -> dict:
    """What a latent folder's shards depend on: the class names (in label order) and, per class, how many
    files it has and a hash of their names."""
    per_class = {}
    for label, name in enumerate(dataset.class_names):
        files = [f for f in dataset.files if f[1] == label]
        per_class[name] = {"files": len(files), "sha256": _files_sha256(dataset.root, files)}
    return {"class_names": list(dataset.class_names), "num_files": len(dataset.files), "classes": per_class}


def dataset_changes(old: dict, new: dict) -> list[str]:
    """How ``new`` differs from ``old`` (two ``dataset_fingerprint``s), one phrase per change."""
    changes = []
    added = [c for c in new["class_names"] if c not in old["class_names"]]
    removed = [c for c in old["class_names"] if c not in new["class_names"]]
    if added:
        changes.append(f"class folder(s) added: {', '.join(added)}")
    if removed:
        changes.append(f"class folder(s) removed: {', '.join(removed)}")
    for name in new["class_names"]:
        before, now = old["classes"].get(name), new["classes"][name]
        if before is None or before == now:
            continue
        if before["files"] != now["files"]:
            changes.append(f"{name}/ has {now['files']} files, {before['files']} then")
        else:
            changes.append(f"{name}/ holds other files than then ({now['files']} in both)")
    if not changes and old["class_names"] != new["class_names"]:
        changes.append(f"the classes are in another order: {old['class_names']} then, {new['class_names']} now")
    return changes


def check_same_dataset(out: Path, fingerprint: dict, image_root: Path, write: bool) -> None:
    """Refuse to continue an extraction in ``out`` over another dataset than the one it began with;
    ``write`` (main process) records ``fingerprint`` on the first run."""
    path = out / DATASET_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            changes = dataset_changes(old, fingerprint)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ShardError(f"{path} is damaged ({exc}); delete {out} to extract it again") from exc
        if changes:
            raise ShardError(f"{image_root} is not the dataset {out} was extracted from: {'; '.join(changes)}. "
                             f"Kept shards would carry the old labels and files: extract into a new --out "
                             f"(or delete {out})")
    elif write:
        tmp = path.with_name(f".{DATASET_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(fingerprint, indent=1))
        os.replace(tmp, path)


def _shard_is_complete(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    try:
        meta = read_shard_metadata(path)
    except ShardError:
        return False  # damaged (writes are atomic, so not by us): redo it
    return all(meta.get(k) == v for k, v in expected.items())


@torch.no_grad()
def _encode(vae, images: torch.Tensor, generator: torch.Generator, latent_scale: float) -> torch.Tensor:
    # DiT samples from the posterior (not its mean) and scales by 0.18215.
    return vae.encode(images).latent_dist.sample(generator=generator) * latent_scale


def extract_latents(image_root: str | os.PathLike, out_dir: str | os.PathLike, *, vae: str = DEFAULT_VAE,
                    image_size: int = 256, flip: bool = True, shard_size: int = 4096, batch_size: int = 32,
                    num_workers: int = 4, latent_dtype: str = "float16", seed: int = 0,
                    latent_scale: float = LATENT_SCALE, mixed_precision: str = "no") -> dict:
    """Encode every image under ``image_root/<class>/`` into shards under ``out_dir`` and write its index.

    Runs under ``accelerate launch`` on many devices or as a plain call on one. Corrupt files are
    skipped, counted and listed in the index. Returns the index (on every process).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardError(f"--out {out} cannot be created as a folder ({exc.strerror})") from exc
    dataset = ClassFolderImages(image_root, image_size)
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
    store_dtype = getattr(torch, latent_dtype)
    identity = {"image_root": str(Path(image_root).resolve()), "image_size": image_size, "vae": vae,
                "flip": flip, "latent_scale": latent_scale, "class_names": list(dataset.class_names)}
    check_same_dataset(out, dataset_fingerprint(dataset), Path(image_root), write=accelerator.is_main_process)
    vae_model = _load_encoder(vae, accelerator.device)
    if image_size % vae_scale_factor(vae_model):
        raise ShardError(f"--image-size {image_size} must be divisible by the VAE's downsampling factor "
                         f"{vae_scale_factor(vae_model)}")

    todo = []
    for k in mine:
        begin, end = k * shard_size, min((k + 1) * shard_size, len(dataset))
        expected = {**identity, "begin": begin, "end": end,
                    "files_sha256": _files_sha256(dataset.root, dataset.files[begin:end])}
        if not _shard_is_complete(out / shard_name(k), expected):
            todo.append((k, begin, end, expected))
    total = sum(end - begin for _, begin, end, _ in todo)
    bar = tqdm(total=total, unit="img", desc=f"extracting latents ({len(mine) - len(todo)} shards already done)",
               disable=not accelerator.is_local_main_process)
    for k, begin, end, expected in todo:
        loader = DataLoader(Subset(dataset, range(begin, end)), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_skipping_corrupt)
        generator = index_generator(seed, k, stream=Stream.LATENT_ENCODING, device=accelerator.device)
        latents, flipped, labels, skipped = [], [], [], []
        for batch in loader:
            skipped += batch.skipped
            bar.update(len(batch.labels) + len(batch.skipped))
            if not len(batch.labels):
                continue
            images = batch.images.to(accelerator.device)
            with accelerator.autocast():
                latents.append(_encode(vae_model, images, generator, latent_scale).to("cpu", store_dtype))
                if flip:
                    flipped.append(_encode(vae_model, images.flip(-1), generator, latent_scale).to("cpu", store_dtype))
            labels.append(batch.labels)
        if skipped:
            bar.write(f"shard {k}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0][0]} ({skipped[0][1]})")
        tensors = {"latents": torch.cat(latents) if latents else torch.empty(0),
                   "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)}
        if flip:
            tensors["latents_flipped"] = torch.cat(flipped) if flipped else torch.empty(0)
        write_shard(out / shard_name(k), tensors, {**expected, "count": len(tensors["labels"]),
                                                   "skipped": [[p, why] for p, why in skipped]})
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards, latent_shape = [], None
        for k in range(num_shards):
            meta = read_shard_metadata(out / shard_name(k))
            shards.append({"file": shard_name(k), "count": meta["count"], "skipped": meta["skipped"]})
            if latent_shape is None and meta["count"]:
                latent_shape = check_shard_file(out / shard_name(k))["latents"]["shape"][1:]
        write_index(out, {"vae": vae, "latent_scale": latent_scale, "image_size": [image_size, image_size],
                          "latent_shape": latent_shape, "num_classes": len(dataset.class_names),
                          "class_names": dataset.class_names, "flipped": flip, "shards": shards})
    accelerator.wait_for_everyone()
    return read_index(out)
