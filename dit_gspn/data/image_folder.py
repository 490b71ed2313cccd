"""ImageNet-style class folders (``root/<class>/<image>``) read as ADM-cropped tensors, corrupt files counted.

A file that PIL cannot decode is not an error that stops an hours-long extraction: the item comes
back with ``image=None`` and the reason, the collate function drops it and hands its path on, and
the caller reports how many were skipped and which. Nothing is dropped silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dit_gspn.cli import check_input_folder
from dit_gspn.errors import UserError

from .transforms import center_crop_arr

#: PIL modes of more than 8 bits per sample, and the largest value each holds. PIL's own ``convert("RGB")``
#: clips them at 255 (a 16-bit greyscale PNG comes out almost all white), so they are scaled instead.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


class ImageFolderError(UserError, ValueError):
    """An image folder that cannot be read as classes of images; the message names the folder."""


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """``img`` as uint8 (H, W, 3) RGB. 16-bit (and 32-bit integer) greyscale is scaled from 0..65535 and float
    greyscale from 0..1 to 0..255, where PIL's ``convert("RGB")`` would clip every value above 255."""
    top = _WIDE_MODES.get(img.mode)
    if top is None:
        return np.array(img.convert("RGB"))
    grey = np.asarray(img, dtype=np.float64)
    grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


#: What PIL raises for a file it cannot decode (truncated, not an image, a broken header).
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


def adm_crop_file(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """The image file at ``path`` as ADM's center crop: uint8 (S, S, 3) RGB. Raises one of
    ``UNREADABLE_IMAGE_ERRORS`` for a file that does not decode."""
    with Image.open(path) as img:
        return center_crop_arr(Image.fromarray(to_rgb_array(img)), image_size)


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
        self.root = check_input_folder(root, "image folder")
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.class_names:
            raise ImageFolderError(f"{self.root} holds no class folders: expected {self.root}/<class>/<image files>")
        self.image_size = int(image_size)
        self.files: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for dirpath, dirnames, filenames in os.walk(self.root / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                self.files += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if not f.startswith(".")]
            if not self.files or self.files[-1][1] != label:
                raise ImageFolderError(f"class folder {self.root / name} holds no files: every class folder needs "
                                       f"images (its label would have none); remove it or add its images")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[index]
        item = {"image": None, "label": label, "index": index, "path": path, "error": None}
        try:
            arr = adm_crop_file(path, self.image_size)
        except UNREADABLE_IMAGE_ERRORS as exc:
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
