"""Pre-extracted VAE latents as sharded safetensors files, and a dataset that reads them lazily.

Layout of a latent folder::

    index.json                  # what the shards hold (see ``write_index``)
    shard-00000.safetensors     # "latents" (n, C, h, w), "labels" (n,) int64,
    shard-00001.safetensors     # and "latents_flipped" (n, C, h, w) when extracted with flips
    ...

Each shard's metadata records which source files it covers and which of them were skipped as corrupt.
Reading opens shards memory-mapped and slices one row at a time, so a training process never holds
more than the rows it is using.
"""
from __future__ import annotations

import bisect
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from dit_gspn.atomic_write import atomic_write, write_text_atomically
from dit_gspn.errors import UserError

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


class ShardError(UserError, ValueError):
    """A latent folder or shard that cannot be used; the message names the file and what is wrong."""


def check_shard_file(path: Path) -> dict:
    """The safetensors header of ``path`` (tensor name -> info, plus ``__metadata__``), after checking that
    the file is as long as its header says. A truncated or non-safetensors file raises ``ShardError``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(f"latent shard {path} is truncated: {size} bytes, not even a safetensors header")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise ShardError(f"latent shard {path} is truncated: its header claims {header_len} bytes, "
                                 f"the file has {size} bytes in all")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"latent shard {path} is not a readable safetensors file: {exc}") from exc
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise ShardError(f"latent shard {path} is truncated: expected {8 + header_len + data_end} bytes, "
                         f"found {size}; delete it and re-run the extraction to rewrite it")
    return header


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write one shard atomically (a temp file, then rename), with ``metadata`` stored as JSON."""
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"info": json.dumps(metadata)})


def read_shard_metadata(path: Path) -> dict:
    """The metadata ``write_shard`` stored in ``path`` (validated as complete first)."""
    header = check_shard_file(path)
    try:
        return json.loads(header["__metadata__"]["info"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ShardError(f"latent shard {path} has no extraction metadata; was it written by extract_latents.py?") from exc


def write_index(root: Path, info: dict) -> Path:
    """Write ``index.json`` atomically. ``info`` holds vae, latent_scale, image_size, latent_shape,
    num_classes, class_names, flipped, and shards: [{file, count, skipped}]."""
    info = {"format_version": FORMAT_VERSION, **info,
            "num_latents": sum(s["count"] for s in info["shards"]),
            "num_skipped": sum(len(s["skipped"]) for s in info["shards"])}
    path = root / INDEX_FILE
    return write_text_atomically(path, json.dumps(info, indent=1))


def read_index(root: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a latent folder, with a clear error when it is missing or broken."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"{path} not found: extract latents into {root} first (extract_latents.py)")
    try:
        index = json.loads(path.read_text())
        index["shards"], index["latent_shape"]  # noqa: B018  (presence check)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShardError(f"{path} is not a valid latent index ({exc}); re-run the extraction") from exc
    return index


class LatentShardDataset(Dataset):
    """``(latent (C, h, w) float32, label)`` pairs from a latent folder, read row by row from memory maps.

    Checks at construction, each naming the shard: every shard complete (not truncated), the
    latents' shape equal to ``expected_shape`` (C, h, w) when given, every label in
    [0, ``num_classes``) when given. With ``flip=True`` (and flipped latents in the shards) the
    dataset holds each latent twice: index ``i + N`` is latent ``i`` of the flipped images.
    """

    def __init__(self, root: str | os.PathLike, expected_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, flip: bool = True):
        self.root = Path(root)
        self.index = read_index(self.root)
        self.flip = bool(flip)
        if self.flip and not self.index.get("flipped", False):
            raise ShardError(f"{self.root / INDEX_FILE}: the shards hold no flipped latents; set flip to false "
                             f"or re-extract with --flip")
        self.files: list[Path] = []
        counts: list[int] = []
        labels = []
        latent_shape = tuple(self.index["latent_shape"])
        if expected_shape is not None and tuple(expected_shape) != latent_shape:
            raise ShardError(f"{self.root / INDEX_FILE}: latents have shape {latent_shape}, the model config "
                             f"expects {tuple(expected_shape)} (in_channels, input_size)")
        for entry in self.index["shards"]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise ShardError(f"latent shard {path} listed in {self.root / INDEX_FILE} is missing")
            header = check_shard_file(path)
            for key in ("latents", "labels") + (("latents_flipped",) if self.flip else ()):
                if key not in header:
                    raise ShardError(f"latent shard {path} has no tensor {key!r}")
            shape = tuple(header["latents"]["shape"])
            if shape[1:] != latent_shape:
                raise ShardError(f"latent shard {path} holds latents of shape {shape[1:]}, "
                                 f"expected {latent_shape}")
            with safe_open(str(path), framework="pt") as f:
                shard_labels = f.get_tensor("labels").long()
            if len(shard_labels) != shape[0]:
                raise ShardError(f"latent shard {path} has {shape[0]} latents but {len(shard_labels)} labels")
            if num_classes is not None and len(shard_labels):
                bad = shard_labels[(shard_labels < 0) | (shard_labels >= num_classes)]
                if bad.numel():
                    raise ShardError(f"latent shard {path} has labels {bad.unique().tolist()[:10]} outside "
                                     f"[0, {num_classes}); check num_classes in the config")
            self.files.append(path)
            counts.append(shape[0])
            labels.append(shard_labels)
        self.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self.num_latents = self.starts[-1]
        if self.num_latents == 0:
            raise ShardError(f"{self.root} holds no latents")
        self._handles: dict[int, object] = {}

    @property
    def class_names(self):
        return self.index.get("class_names")

    def __len__(self) -> int:
        return self.num_latents * (2 if self.flip else 1)

    def __getstate__(self):  # safetensors handles do not pickle: worker processes reopen them
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _row(self, index: int) -> tuple[int, int, int]:
        """(flipped, shard, row) of dataset item ``index``."""
        flipped, i = divmod(index, self.num_latents)
        shard = bisect.bisect_right(self.starts, i) - 1
        return flipped, shard, i - self.starts[shard]

    def locate(self, index: int) -> str:
        """Where item ``index`` is stored, for messages: ``<shard file> row <r> (latents_flipped)``."""
        flipped, shard, row = self._row(index)
        return f"{self.files[shard]} row {row} ({'latents_flipped' if flipped else 'latents'})"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flipped, shard, row = self._row(index)
        i = index % self.num_latents
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
        latent = handle.get_slice("latents_flipped" if flipped else "latents")[row:row + 1][0]
        return latent.float(), int(self.labels[i])
