"""Encode an ImageNet-style folder into sharded VAE latents, once, on one or many devices.

Shard k always covers source files [k * shard_size, (k + 1) * shard_size) of the sorted file list,
and process r of R encodes the shards with k % R == r, so a re-run (after a crash, or with a
different number of GPUs) skips every complete shard and redoes only the missing ones.

A re-run continues the same extraction or refuses: ``dataset.json`` records the class names and each
class's files (a count and a hash), and the settings that decide what a shard holds (``SETTINGS``: image
size, VAE, flips, latent scale and dtype, seed, shard size, mixed precision); each shard records the hash
of the files it covers. A class folder added, removed or changed, or a setting changed since the first run,
is named (old and new value) instead of mixing two kinds of shards in one folder. A folder written before
settings were recorded is compared with what its shards record, and gets its settings recorded.

Nothing is created before the arguments, the image folder and the VAE are checked, and the output folder
is locked while an extraction writes it (``dit_gspn.folder_lock``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dit_gspn.atomic_write import write_text_atomically
from dit_gspn.cli import check_output_folder
from dit_gspn.folder_lock import decide_on_main_process, lock_folder, release_folder
from dit_gspn.seeding import Stream, index_generator
from dit_gspn.vae import DEFAULT_VAE, LATENT_SCALE, encode, load_vae, vae_scale_factor

from .image_folder import ClassFolderImages, collate_skipping_corrupt
from .latent_shards import (ShardError, check_shard_file, read_index, read_shard_metadata, shard_name,
                            write_index, write_shard)


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


#: The extraction settings that decide what a shard holds; a re-run into the same folder must repeat them.
SETTINGS = ("image_size", "vae", "flip", "latent_scale", "latent_dtype", "seed", "shard_size", "mixed_precision")
#: safetensors' dtype names and the --latent-dtype values they store.
_STORED_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def vae_setting(vae: str) -> str:
    """How a folder records ``--vae``: a local folder as its absolute path (a relative one would name another
    folder from another working directory), a hub name as it is."""
    return str(Path(vae).resolve()) if Path(vae).is_dir() else vae


def settings_of_shards(out: Path) -> dict:
    """The settings a folder's shards record: all of ``SETTINGS`` for shards written since they were recorded;
    for older shards, those their metadata and header tell (image size, VAE, flip, latent scale and dtype, the
    shard size when a shard after the first exists)."""
    found = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        try:
            meta, header = read_shard_metadata(path), check_shard_file(path)
        except ShardError:
            continue  # a damaged shard is redone; another one tells the settings
        found = {k: meta[k] for k in SETTINGS if k in meta}
        if "vae" in found:
            found["vae"] = vae_setting(found["vae"])
        if "latent_dtype" not in found and "latents" in header:
            found["latent_dtype"] = _STORED_DTYPES.get(header["latents"]["dtype"], header["latents"]["dtype"])
        k = int(path.name[len("shard-"):-len(".safetensors")])
        if "shard_size" not in found and k > 0 and isinstance(meta.get("begin"), int):
            found["shard_size"] = meta["begin"] // k
        if found:
            return found
    return found


def settings_changes(old: dict, new: dict) -> list[str]:
    """How ``new`` differs from ``old`` (settings), one ``key: old then, new now`` per key ``old`` records."""
    return [f"{k}: {old[k]!r} then, {new[k]!r} now" for k in SETTINGS if k in old and old[k] != new[k]]


def check_same_extraction(out: Path, fingerprint: dict, settings: dict, image_root: Path) -> None:
    """Refuse to continue an extraction in ``out`` over another dataset, or with other settings, than the one it
    began with; record both on the first run (and the settings of a folder from before they were recorded).
    The main process only, holding ``out``'s lock."""
    path = out / DATASET_FILE
    recorded = {}
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
            changes = dataset_changes(recorded, fingerprint)
            old_settings = recorded.get("settings")
            if old_settings is not None and not isinstance(old_settings, dict):
                raise TypeError(f"settings is a {type(old_settings).__name__}")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise ShardError(f"{path} is damaged ({exc}); delete {out} to extract it again") from exc
        if changes:
            raise ShardError(f"{image_root} is not the dataset {out} was extracted from: {'; '.join(changes)}. "
                             f"Kept shards would carry the old labels and files: extract into a new --out "
                             f"(or delete {out})")
    old_settings = recorded.get("settings") or settings_of_shards(out)
    changed = settings_changes(old_settings, settings)
    if changed:
        raise ShardError(f"{out} was extracted with other settings ({'; '.join(changed)}): this run would replace "
                         f"its shards with latents of another kind. Run with the settings it was made with, extract "
                         f"into a new --out, or delete {out} to start over")
    if "settings" not in recorded:
        write_text_atomically(path, json.dumps({**fingerprint, "settings": settings}, indent=1))


def _shard_is_complete(path: Path, expected: dict) -> bool:
    """Whether ``path`` is a readable shard over the files ``expected`` names (its begin, end and files' hash);
    the folder's settings are checked once, by ``check_same_extraction``."""
    if not path.is_file():
        return False
    try:
        meta = read_shard_metadata(path)
    except ShardError:
        return False  # damaged (writes are atomic, so not by us): redo it
    return all(meta.get(k) == expected[k] for k in ("begin", "end", "files_sha256"))


def _encode_shard(images: Subset, vae_model, generator: torch.Generator, bar, *, accelerator, batch_size: int,
                  num_workers: int, flip: bool, latent_scale: float, store_dtype: torch.dtype) -> tuple[dict, list]:
    """One shard's tensors (``latents``, ``labels``, and ``latents_flipped`` with ``flip``) from ``images``, and
    the (path, reason) of each file skipped as unreadable."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_corrupt)
    latents, flipped, labels, skipped = [], [], [], []
    for batch in loader:
        skipped += batch.skipped
        bar.update(len(batch.labels) + len(batch.skipped))
        if not len(batch.labels):
            continue
        pixels = batch.images.to(accelerator.device)
        with accelerator.autocast():
            latents.append(encode(vae_model, pixels, generator, latent_scale).to("cpu", store_dtype))
            if flip:
                flipped.append(encode(vae_model, pixels.flip(-1), generator, latent_scale).to("cpu", store_dtype))
        labels.append(batch.labels)
    tensors = {"latents": torch.cat(latents) if latents else torch.empty(0),
               "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)}
    if flip:
        tensors["latents_flipped"] = torch.cat(flipped) if flipped else torch.empty(0)
    return tensors, skipped


def extract_latents(image_root: str | os.PathLike, out_dir: str | os.PathLike, *, vae: str = DEFAULT_VAE,
                    image_size: int = 256, flip: bool = True, shard_size: int = 4096, batch_size: int = 32,
                    num_workers: int = 4, latent_dtype: str = "float16", seed: int = 0,
                    latent_scale: float = LATENT_SCALE, mixed_precision: str = "no") -> dict:
    """Encode every image under ``image_root/<class>/`` into shards under ``out_dir`` and write its index.

    Runs under ``accelerate launch`` on many devices or as a plain call on one. Corrupt files are
    skipped, counted and listed in the index. Returns the index (on every process). ``out_dir`` is locked
    while it runs (``FolderInUseError`` when another extraction has it).
    """
    from accelerate import Accelerator

    out = Path(out_dir)
    dataset = ClassFolderImages(image_root, image_size)  # the inputs, the output and the VAE are checked first,
    check_output_folder(out)                              # and nothing is created before all three are
    settings = {"image_size": image_size, "vae": vae_setting(vae), "flip": flip, "latent_scale": latent_scale,
                "latent_dtype": latent_dtype, "seed": seed, "shard_size": shard_size,
                "mixed_precision": mixed_precision}
    fingerprint = dataset_fingerprint(dataset)
    accelerator = Accelerator(mixed_precision=mixed_precision)

    def claim():  # lock the folder for this launch, then compare it with (or record) this extraction
        lock_folder(out, "a latent extraction")
        check_same_extraction(out, fingerprint, settings, Path(image_root))

    try:  # the lock that claim() takes is let go however the extraction ends
        claimed = out.is_dir()
        if claimed:  # a re-run: a refusal comes before the VAE loads
            decide_on_main_process(accelerator, claim)
        vae_model = load_vae(vae, accelerator.device)
        if image_size % vae_scale_factor(vae_model):
            raise ShardError(f"--image-size {image_size} must be divisible by the VAE's downsampling factor "
                             f"{vae_scale_factor(vae_model)}")
        if not claimed:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ShardError(f"--out {out} cannot be created as a folder ({exc.strerror})") from exc
            decide_on_main_process(accelerator, claim)
        accelerator.wait_for_everyone()
        num_shards = (len(dataset) + shard_size - 1) // shard_size
        mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
        store_dtype = getattr(torch, latent_dtype)
        identity = {**settings, "image_root": str(Path(image_root).resolve()), "class_names": list(dataset.class_names)}

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
        try:  # the bar ends its line before any error is printed
            for k, begin, end, expected in todo:
                generator = index_generator(seed, k, stream=Stream.LATENT_ENCODING, device=accelerator.device)
                tensors, skipped = _encode_shard(Subset(dataset, range(begin, end)), vae_model, generator, bar,
                                                 accelerator=accelerator, batch_size=batch_size,
                                                 num_workers=num_workers, flip=flip, latent_scale=latent_scale,
                                                 store_dtype=store_dtype)
                if skipped:
                    bar.write(f"shard {k}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0][0]} "
                              f"({skipped[0][1]})")
                write_shard(out / shard_name(k), tensors, {**expected, "count": len(tensors["labels"]),
                                                           "skipped": [[p, why] for p, why in skipped]})
        finally:
            bar.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shards, latent_shape = [], None
            for k in range(num_shards):
                meta = read_shard_metadata(out / shard_name(k))
                shards.append({"file": shard_name(k), "count": meta["count"], "skipped": meta["skipped"]})
                if latent_shape is None and meta["count"]:
                    latent_shape = check_shard_file(out / shard_name(k))["latents"]["shape"][1:]
            write_index(out, {"vae": settings["vae"], "latent_scale": latent_scale,
                              "image_size": [image_size, image_size], "latent_shape": latent_shape,
                              "num_classes": len(dataset.class_names), "class_names": dataset.class_names,
                              "flipped": flip, "shards": shards})
        accelerator.wait_for_everyone()
        return read_index(out)
    finally:
        release_folder(out)
