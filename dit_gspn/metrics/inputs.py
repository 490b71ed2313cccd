"""What can be compared: a folder of images, an image ``.npz`` in ADM's layout (``arr_0``), or stored statistics
(``mu`` / ``sigma``, and ``mu_s`` / ``sigma_s`` for sFID), or an ``.npz`` holding both (ADM's reference batches).

Each input knows its kind, its sha256 (of the file, or of a folder's image files in sorted order), how many
images it holds, and yields them as uint8 (B, 3, H, W) tensors, the form the extractors take. An ``.npz`` is
read from its zip member in batches and a folder file by file, so 50K samples never sit in memory at once.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from dit_gspn.errors import MissingFileError, UserError
from dit_gspn.data.image_folder import UNREADABLE_IMAGE_ERRORS, to_rgb_array
from dit_gspn.hashing import sha256_file, sha256_files
from dit_gspn.image_npz import IMAGES, ImageNpzError, iter_batches, read_header

from . import statistics

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalInputError(UserError, ValueError):
    """An evaluation input that cannot be used; the message names the file and what is wrong."""


@dataclass
class EvalInput:
    """One side of a comparison. ``kind`` is ``folder``, ``npz`` (images, perhaps statistics too) or ``stats``."""

    path: Path
    kind: str

    @cached_property
    def sha256(self) -> str:
        if self.kind != "folder":
            return sha256_file(self.path)
        return sha256_files(self.path, self.files)

    @cached_property
    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    @property
    def has_images(self) -> bool:
        return self.kind in ("folder", "npz")

    @cached_property
    def stored(self) -> set[str]:
        """The statistics the file holds: a subset of {"pool", "spatial"} (empty for a folder)."""
        return set() if self.kind == "folder" else statistics.stored_keys(self.path)

    @property
    def has_stats(self) -> bool:
        return "pool" in self.stored

    def uses_stored_stats(self, stats_from_images: bool) -> bool:
        """Whether FID takes this input's stored statistics: it holds some, and ``stats_from_images`` does not ask
        for them to be computed from images it also holds."""
        return self.has_stats and not (stats_from_images and self.has_images)

    def check(self) -> None:
        """Read what can be checked without computing anything (an .npz's header and statistics; every image's
        header and size in a folder), so that a bad input is named before any weights load."""
        if self.kind == "folder":
            sizes = {}
            for path in self.files:
                try:
                    with Image.open(path) as img:
                        img.verify()
                        sizes.setdefault(img.size, path)
                except UNREADABLE_IMAGE_ERRORS as err:
                    raise _unreadable(path, err, "or make a reference of the folder with python -m "
                                                 "evaluation.reference (skips such files)") from err
                if len(sizes) > 1:
                    (first_size, first), (size, odd) = list(sizes.items())[:2]
                    raise EvalInputError(f"{odd} is {size[0]}x{size[1]} pixels but {first} (and the files before "
                                         f"it) {first_size[0]}x{first_size[1]}: every image of {self.path} must "
                                         f"have the same size; python -m evaluation.reference {self.path} "
                                         f"--image-size S center-crops them (ADM's crop) into a reference")
            return
        if self.has_images and self.count == 0:
            raise EvalInputError(f"{self.path} holds no images: arr_0 is empty (0 x H x W x 3)")
        for name in self.stored:
            statistics.read_statistics(self.path, spatial=name == "spatial")

    @cached_property
    def count(self) -> int | None:
        """Images in the input (None for statistics only)."""
        if self.kind == "folder":
            return len(self.files)
        return read_header(self.path)[0] if self.has_images else None

    def stats(self, spatial: bool = False) -> dict[str, np.ndarray]:
        """The stored FID statistics (``spatial``: sFID's), as float64 ``mu`` (D,) and ``sigma`` (D, D)."""
        return statistics.read_statistics(self.path, spatial)

    def metadata(self) -> dict:
        """What a statistics file written by this project records (extractor, weights hash, count)."""
        return statistics.read_metadata(self.path) if self.kind == "stats" else {}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images as uint8 (B, 3, H, W) tensors, in a fixed order."""
        if self.kind == "folder":
            for start in range(0, len(self.files), batch_size):
                yield torch.stack([_read_image(p) for p in self.files[start:start + batch_size]])
        elif self.has_images:
            for images in iter_batches(self.path, batch_size):
                yield torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # one copy: C-order NCHW, writable
        else:
            raise EvalInputError(f"{self.path} holds statistics only (mu/sigma), no images: it can serve FID, "
                                 f"not IS, KID or precision/recall")

    def describe(self) -> dict:
        """What the report says of this input."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "count": self.count}


def open_input(path: str | Path) -> EvalInput:
    """An EvalInput for a folder of images, or an ``.npz`` with ``arr_0`` and/or statistics."""
    path = Path(path)
    if path.is_dir():
        found = EvalInput(path, "folder")
        if not found.files:
            raise EvalInputError(f"{path} holds no images with extensions {IMAGE_EXTENSIONS}")
        return found
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected a folder of images or an .npz)")
    if path.suffix != ".npz":
        raise EvalInputError(f"{path}: expected a folder of images or an .npz (ADM's layout), got a "
                             f"{path.suffix or 'suffix-less'} file")
    try:
        with np.load(path) as data:
            keys = list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise EvalInputError(f"{path} is not a readable .npz ({type(err).__name__}: {err}); truncated or not "
                             f"written by numpy?") from err
    if IMAGES in keys:
        found = EvalInput(path, "npz")
        try:
            found.count  # noqa: B018 (reads and checks arr_0's header)
        except ImageNpzError as err:
            raise EvalInputError(str(err)) from err
        return found
    if not {"mu", "sigma"} <= set(keys):
        raise EvalInputError(f"{path} has neither arr_0 (images) nor mu and sigma (statistics); keys: {keys}")
    return EvalInput(path, "stats")


def _read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return torch.from_numpy(to_rgb_array(img)).permute(2, 0, 1).contiguous()
    except UNREADABLE_IMAGE_ERRORS as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException, more: str = "") -> EvalInputError:
    """The error for an image file that does not decode: the file, PIL's reason, and what to do."""
    return EvalInputError(f"{path} is not a readable image ({type(err).__name__}: {err}); remove or replace it"
                          f"{', ' + more if more else ''}")
