"""ImageNet-style class folders (``root/<class>/<image>``) read as ADM-cropped tensors, corrupt files counted.

A file that PIL cannot decode is not an error that stops an hours-long extraction: the item comes
back with ``image=None`` and the reason, the collate function drops it and hands its path on, and
the caller reports how many were skipped and which. Nothing is dropped silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .transforms import center_crop_arr


@dataclass
class ImageBatch:
    """A collated batch: the images that decoded, their labels and dataset indices, and the files skipped."""
    images: torch.Tensor  # (N, 3, S, S) in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64, positions in the dataset
    skipped: list[tuple[str, str]]  # (path, reason) for each file that did not decode


class ClassFolderImages(Dataset):
    """Every non-hidden file under ``root/<class>/`` (recursively), labelled by its class folder's sorted index.

    Items are dicts: ``image`` (3, S, S) float in [-1, 1] after ADM's ``center_crop_arr`` (None if the file
    does not decode), ``label``, ``index``, ``path``, ``error`` (None, or why it was skipped).
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"{self.root} holds no class folders: expected {self.root}/<class>/<image files>")
        self.image_size = int(image_size)
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, dirnames, filenames in os.walk(self.root / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                self.files += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if not f.startswith(".")]
        if not self.files:
            raise ValueError(f"the class folders under {self.root} hold no files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[index]
        item = {"image": None, "label": label, "index": index, "path": path, "error": None}
        try:
            with Image.open(path) as img:
                arr = center_crop_arr(img.convert("RGB"), self.image_size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            item["error"] = f"{type(exc).__name__}: {exc}"
            return item
        item["image"] = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0
        return item


def collate_skipping_corrupt(items: list[dict]) -> ImageBatch:
    """Stack the items that decoded; list the ones that did not in ``skipped``."""
    good = [it for it in items if it["image"] is not None]
    skipped = [(it["path"], it["error"]) for it in items if it["image"] is None]
    if good:
        images = torch.stack([it["image"] for it in good])
    else:
        images = torch.empty(0, 3, 0, 0)
    return ImageBatch(images=images, labels=torch.tensor([it["label"] for it in good], dtype=torch.long),
                      indices=torch.tensor([it["index"] for it in good], dtype=torch.long), skipped=skipped)
