"""Encode an ImageNet-style folder into sharded VAE latents, once, on one or many devices.

Shard k always covers source files [k * shard_size, (k + 1) * shard_size) of the sorted file list,
and process r of R encodes the shards with k % R == r, so a re-run (after a crash, or with a
different number of GPUs) skips every complete shard and redoes only the missing ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dit_gspn.sampling.checkpoint import DEFAULT_VAE, LATENT_SCALE, load_vae

from .image_folder import ClassFolderImages, collate_skipping_corrupt
from .latent_shards import (ShardError, check_shard_file, read_index, read_shard_metadata, shard_name,
                            write_index, write_shard)


def _load_encoder(vae: str, device):
    """The AutoencoderKL (hub name or local folder), frozen, on ``device``."""
    return load_vae(vae).to(device).requires_grad_(False)


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
    out.mkdir(parents=True, exist_ok=True)
    dataset = ClassFolderImages(image_root, image_size)
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
    store_dtype = getattr(torch, latent_dtype)
    vae_model = _load_encoder(vae, accelerator.device)
    identity = {"image_root": str(Path(image_root).resolve()), "image_size": image_size, "vae": vae,
                "flip": flip, "latent_scale": latent_scale}

    todo = []
    for k in mine:
        begin, end = k * shard_size, min((k + 1) * shard_size, len(dataset))
        expected = {**identity, "begin": begin, "end": end}
        if not _shard_is_complete(out / shard_name(k), expected):
            todo.append((k, begin, end, expected))
    total = sum(end - begin for _, begin, end, _ in todo)
    bar = tqdm(total=total, unit="img", desc=f"extracting latents ({len(mine) - len(todo)} shards already done)",
               disable=not accelerator.is_local_main_process)
    for k, begin, end, expected in todo:
        loader = DataLoader(Subset(dataset, range(begin, end)), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_skipping_corrupt)
        generator = torch.Generator(accelerator.device).manual_seed(seed * 1_000_003 + k)
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
