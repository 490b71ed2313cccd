"""The image-batch ``.npz`` that ADM's sampler writes and its evaluator reads: ``arr_0`` uint8 (N, H, W, 3) and,
optionally, ``arr_1`` int64 class labels.

Written whole (``write_npz``) or streamed from parts (``ImageNpzWriter``, one part in memory at a time); both
give the bytes ``np.savez(path, images, labels)`` gives (a stored zip, ``.npy`` header version 1.0, zip64 entries,
the zip format's fixed 1980 timestamps), so the file is a function of its content. Read whole (``read_npz``) or
in batches (``iter_batches``, as ADM's evaluator reads it), so that 50K samples never sit in memory at once.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dit_gspn.atomic_write import atomic_write, savez_atomically
from dit_gspn.errors import UserError

IMAGES, LABELS = "arr_0", "arr_1"


class ImageNpzError(UserError, ValueError):
    """An image ``.npz`` that is not in ADM's layout, or is damaged; the message names the file."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8, rounded to the nearest level as DiT's sample_ddp.py
    rounds (ADM's image_sample.py truncates instead)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _check_images(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Atomically write ADM's layout from arrays in memory: ``arr_0`` images, ``arr_1`` int64 labels (if any)."""
    _check_images(images, str(path))
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savez_atomically(path, *arrays)
    return path


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels or None), the whole file in memory."""
    read_header(path)
    with np.load(path) as data:
        return data[IMAGES], (data[LABELS] if LABELS in data.files else None)


def _npy_header(member, path, key: str = IMAGES) -> tuple[int, ...]:
    """The shape in ``<key>.npy``'s header, after checking it is uint8 (N, H, W, 3) in C order."""
    try:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(member)
    except (ValueError, EOFError, OSError) as err:
        raise ImageNpzError(f"{path}: {key} has no readable .npy header ({err})") from err
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ImageNpzError(f"{path}: {key} must be uint8 (N, H, W, 3) in C order (ADM's layout); "
                            f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
    return tuple(shape)


def read_header(path: str | os.PathLike, key: str = IMAGES) -> tuple[int, int, int, int]:
    """The shape (N, H, W, 3) of the images stored as ``key`` (ADM's ``arr_0``), read from its header alone."""
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{key}.npy" not in archive.namelist():
                raise ImageNpzError(f"{path} has no {key} (ADM's layout keeps the images in {IMAGES}); "
                                    f"keys: {[n.removesuffix('.npy') for n in archive.namelist()]}")
            with archive.open(f"{key}.npy") as member:
                return _npy_header(member, path, key)
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ImageNpzError(f"{path} is not a readable .npz ({type(err).__name__}: {err}); truncated?") from err


def iter_batches(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """``arr_0`` in order as uint8 (B, H, W, 3) arrays of ``batch_size`` images (the last may be smaller), read
    from the zip member one batch at a time."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES}.npy") as member:
        shape = _npy_header(member, path)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            try:
                raw = member.read(n * per_image)
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise ImageNpzError(f"{path}: arr_0 cannot be read after {start} images ({err})") from err
            if len(raw) != n * per_image:
                raise ImageNpzError(f"{path}: arr_0 ends after {start} of {shape[0]} images (truncated file?)")
            yield np.frombuffer(raw, dtype=np.uint8).reshape(n, *shape[1:])


class ImageNpzWriter:
    """Writes ``path`` in ADM's layout from parts, as ``np.savez(path, images, labels)`` would from whole arrays.

        with ImageNpzWriter(out, count, height, width) as writer:
            for images, labels in parts:
                writer.append(images, labels)

    The file grows at ``atomic_write``'s temporary sibling of ``path`` and replaces ``path`` once all ``count``
    images are in; on an exception (here or in the block) the temporary file is removed, ``path`` is untouched,
    and a full disk is a ``DiskFullError``. Labels, 8 bytes an image, are kept until the end because ``arr_1``
    follows ``arr_0`` in the archive.
    """

    def __init__(self, path: str | os.PathLike, count: int, height: int, width: int):
        self.path = Path(path)
        self.shape = (int(count), int(height), int(width), 3)
        self.written = 0
        self._labels: list[np.ndarray] | None = None

    def __enter__(self) -> "ImageNpzWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._member = None
        with contextlib.ExitStack() as stack:  # an error before the block starts unwinds what was opened
            tmp = stack.enter_context(atomic_write(self.path))
            self._file = stack.enter_context(open(tmp, "wb"))
            self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            stack.callback(self._close_archive)
            self._member = self._zip.open(f"{IMAGES}.npy", "w", force_zip64=True)
            np.lib.format.write_array_header_1_0(self._member, {"descr": "|u1", "fortran_order": False,
                                                                "shape": self.shape})
            self._open = stack.pop_all()
        return self

    def append(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add the next images (uint8 (n, H, W, 3)) and, for every part or none, their labels."""
        _check_images(images, str(self.path))
        if images.shape[1:] != self.shape[1:] or self.written + len(images) > self.shape[0]:
            raise ValueError(f"{self.path}: got {len(images)} images of {images.shape[1:]} after {self.written}, "
                             f"but the file holds {self.shape[0]} of {self.shape[1:]}")
        if (labels is None) != (self._labels is None) and self.written:
            raise ValueError(f"{self.path}: give labels with every part or with none")
        if labels is not None:
            if len(labels) != len(images):
                raise ValueError(f"{self.path}: {len(images)} images but {len(labels)} labels")
            if self._labels is None:
                self._labels = []
            self._labels.append(np.asarray(labels, dtype=np.int64))
        self._member.write(memoryview(np.ascontiguousarray(images)).cast("B"))
        self.written += len(images)

    def __exit__(self, kind, error, trace) -> bool:
        """Finish the archive and let ``atomic_write`` rename it into place, or (on an error) remove it."""
        if kind is None:
            try:
                self._finish()
            except BaseException as err:
                if not self._open.__exit__(type(err), err, err.__traceback__):
                    raise
                return False
            self._open.close()
            return False
        return self._open.__exit__(kind, error, trace)

    def _finish(self) -> None:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.path}: only {self.written} of {self.shape[0]} images were given")
        self._member.close()
        if self._labels is not None:
            with self._zip.open(f"{LABELS}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.concatenate(self._labels))
        self._zip.close()

    def _close_archive(self) -> None:
        """Close the member and the archive if they are still open (after an error: their bytes go nowhere)."""
        for part in (self._member, self._zip):
            with contextlib.suppress(Exception):
                if part is not None:
                    part.close()
