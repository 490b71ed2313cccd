"""What can be compared: a folder of images, an ADM-layout .npz (``arr_0``), or stored statistics (``mu``/``sigma``).

Each input knows its kind, its sha256 (of the file, or of a folder's image files in sorted order), how many
images it holds, and yields them as uint8 (B, 3, H, W) tensors, the form torch-fidelity's extractors take.
An ``.npz`` is read from the zip member in batches (as ADM's evaluator does), so 50K samples never sit in
memory at once.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dit_gspn.cli import MissingFileError, UserError
from dit_gspn.data.image_folder import to_rgb_array
from dit_gspn.hashing import sha256_file, sha256_files
from dit_gspn.sampling.provenance import read_provenance

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalInputError(UserError, ValueError):
    """An evaluation input that cannot be used; the message names the file and what is wrong."""


@dataclass
class EvalInput:
    """One side of a comparison. ``kind`` is ``folder``, ``npz`` or ``stats``."""

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
        return self.kind == "folder" or (self.kind == "npz" and "arr_0" in self._npz_keys)

    @property
    def has_stats(self) -> bool:
        return self.kind == "stats" or (self.kind == "npz" and {"mu", "sigma"} <= set(self._npz_keys))

    @cached_property
    def _npz_keys(self) -> list[str]:
        try:
            with np.load(self.path) as data:
                return list(data.files)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise EvalInputError(f"{self.path} is not a readable .npz ({type(err).__name__}: {err}); "
                                 f"truncated or not written by numpy?") from err

    def check(self) -> None:
        """Read what can be checked without computing anything (an .npz's header; every image's header and
        size in a folder), so that a bad input is named before any weights load."""
        if self.kind == "folder":
            sizes = {}
            for path in self.files:
                try:
                    with Image.open(path) as img:
                        img.verify()
                        sizes.setdefault(img.size, path)
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                    raise EvalInputError(f"{path} is not a readable image ({type(err).__name__}: {err}); "
                                         f"remove or replace it, or make a reference of the folder with "
                                         f"python -m evaluation.reference (skips such files)") from err
                if len(sizes) > 1:
                    (first_size, first), (size, odd) = list(sizes.items())[:2]
                    raise EvalInputError(f"{odd} is {size[0]}x{size[1]} pixels but {first} (and the files before "
                                         f"it) {first_size[0]}x{first_size[1]}: every image of {self.path} must "
                                         f"have the same size; python -m evaluation.reference {self.path} "
                                         f"--image-size S center-crops them (ADM's crop) into a reference")
        elif self.has_images:
            self.count  # noqa: B018  (reads and checks arr_0's header)

    @cached_property
    def count(self) -> int | None:
        """Images in the input (None for statistics only)."""
        if self.kind == "folder":
            return len(self.files)
        if not self.has_images:
            return None
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
                return _read_npy_header(f, self.path)[0][0]
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise EvalInputError(f"{self.path}: arr_0 cannot be read ({type(err).__name__}: {err})") from err

    def stats(self) -> dict[str, np.ndarray]:
        """The stored FID statistics, as float64 ``mu`` (D,) and ``sigma`` (D, D)."""
        if not self.has_stats:
            raise EvalInputError(f"{self.path} holds no mu/sigma statistics")
        with np.load(self.path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise EvalInputError(f"{self.path}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
        return {"mu": mu, "sigma": sigma}

    def metadata(self) -> dict:
        """Extra keys a stats file written by this tool carries (extractor, weights hash, count)."""
        if self.kind != "stats":
            return {}
        with np.load(self.path) as data:
            return {k: data[k].item() for k in ("feature_extractor", "weights_sha256", "count") if k in data.files}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images as uint8 (B, 3, H, W) tensors, in a fixed order."""
        if self.kind == "folder":
            for start in range(0, len(self.files), batch_size):
                yield torch.stack([_read_image(p) for p in self.files[start:start + batch_size]])
        elif self.has_images:
            yield from _npz_batches(self.path, batch_size)
        else:
            raise EvalInputError(f"{self.path} holds statistics only (mu/sigma), no images: it can serve FID, "
                             f"not IS, KID or precision/recall")

    def describe(self) -> dict:
        """What the report says of this input; a sample ``.npz``'s provenance file (how it was drawn) is copied."""
        entry = {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "count": self.count}
        if self.kind != "folder":
            provenance = read_provenance(self.path)
            if provenance is not None:
                entry["provenance"] = provenance
        return entry


def open_input(path: str | Path) -> EvalInput:
    """An EvalInput for a folder of images, an ``.npz`` with ``arr_0`` and/or ``mu``/``sigma``."""
    path = Path(path)
    if path.is_dir():
        found = EvalInput(path, "folder")
        if not found.files:
            raise EvalInputError(f"{path} holds no images with extensions {IMAGE_EXTENSIONS}")
        return found
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected a folder of images or an .npz)")
    if path.suffix != ".npz":
        raise EvalInputError(f"{path}: expected a folder of images or an .npz (ADM's layout), got a {path.suffix} file")
    found = EvalInput(path, "npz")
    keys = found._npz_keys
    if "arr_0" not in keys:
        if not {"mu", "sigma"} <= set(keys):
            raise EvalInputError(f"{path} has neither arr_0 (images) nor mu and sigma (statistics); keys: {keys}")
        found.kind = "stats"
    return found


def _read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return torch.from_numpy(to_rgb_array(img)).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise EvalInputError(f"{path} is not a readable image ({type(err).__name__}: {err}); "
                             f"remove or replace it") from err


def _read_npy_header(f, path) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise EvalInputError(f"{path}: arr_0 must be uint8 (N, H, W, 3) in C order (ADM's layout); "
                         f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
    return shape, dtype


def _npz_batches(path: Path, batch_size: int) -> Iterator[torch.Tensor]:
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape, _ = _read_npy_header(f, path)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            raw = f.read(n * per_image)
            if len(raw) != n * per_image:
                raise EvalInputError(f"{path}: arr_0 ends after {start} of {shape[0]} images (truncated file?)")
            images = np.frombuffer(raw, dtype=np.uint8).reshape(n, *shape[1:])
            yield torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous()
