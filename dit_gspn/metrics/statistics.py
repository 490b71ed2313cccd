"""Reference statistics files: FID's ``mu`` / ``sigma`` and sFID's ``mu_s`` / ``sigma_s``, as ADM's reference batches
(``VIRTUAL_imagenet256_labeled.npz``) carry them, plus what this project records about their making.

A file written here holds ``mu`` (D,), ``sigma`` (D, D), and when the extractor has spatial features ``mu_s``
(2023,), ``sigma_s`` (2023, 2023), all float64; and ``feature_extractor`` (its name), ``weights_sha256`` (the
Inception weights' or the extractor file's hash), ``count`` and ``source_sha256``. Reading checks each pair
(a float dtype, (D,) and (D, D), finite values) and names the file and the key that is wrong.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from dit_gspn.atomic_write import savez_atomically
from dit_gspn.errors import UserError

#: (mean key, covariance key) of FID's and of sFID's statistics.
POOL_KEYS, SPATIAL_KEYS = ("mu", "sigma"), ("mu_s", "sigma_s")
METADATA_KEYS = ("feature_extractor", "weights_sha256", "count", "source_sha256")


class StatisticsError(UserError, ValueError):
    """A statistics file that cannot be used; the message names the file, the key and what is wrong."""


def _keys(path: Path) -> list[str]:
    try:
        with np.load(path) as data:
            return list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StatisticsError(f"{path} is not a readable .npz ({type(err).__name__}: {err})") from err


def _pair(data, path: Path, keys: tuple[str, str]) -> dict[str, np.ndarray]:
    """One checked (mean, covariance) pair as float64 ``{"mu", "sigma"}``."""
    mean_key, cov_key = keys
    mean, cov = data[mean_key], data[cov_key]
    for key, value in ((mean_key, mean), (cov_key, cov)):
        if not np.issubdtype(value.dtype, np.floating):
            raise StatisticsError(f"{path}: {key} has dtype {value.dtype}; statistics are floating point "
                                  f"(float32 or float64)")
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise StatisticsError(f"{path}: {mean_key} must be (D,) and {cov_key} (D, D); got {mean.shape} and "
                              f"{cov.shape}")
    for key, value in ((mean_key, mean), (cov_key, cov)):
        bad = int(np.size(value) - np.isfinite(value).sum())
        if bad:
            raise StatisticsError(f"{path}: {key} holds {bad} NaN or infinite values; recompute the statistics")
    return {"mu": mean.astype(np.float64), "sigma": cov.astype(np.float64)}


def stored_keys(path: str | os.PathLike) -> set[str]:
    """Which of the two pairs ``path`` holds: a subset of {"pool", "spatial"}."""
    keys = set(_keys(Path(path)))
    return {name for name, pair in (("pool", POOL_KEYS), ("spatial", SPATIAL_KEYS)) if set(pair) <= keys}


def read_statistics(path: str | os.PathLike, spatial: bool = False) -> dict[str, np.ndarray]:
    """FID's ``{"mu", "sigma"}`` from ``path`` (``spatial``: sFID's, from ``mu_s`` / ``sigma_s``), checked."""
    path = Path(path)
    keys = SPATIAL_KEYS if spatial else POOL_KEYS
    if not set(keys) <= set(_keys(path)):
        raise StatisticsError(f"{path} holds no {' / '.join(keys)} statistics")
    with np.load(path) as data:
        return _pair(data, path, keys)


def read_metadata(path: str | os.PathLike) -> dict:
    """What a file written by ``write_statistics`` records (extractor, weights hash, count, source hash)."""
    with np.load(path) as data:
        return {k: data[k].item() for k in METADATA_KEYS if k in data.files}


def write_statistics(path: str | os.PathLike, pool: dict, spatial: dict | None = None, *, feature_extractor: str,
                     weights_sha256: str, count: int, source_sha256: str) -> Path:
    """Write a statistics ``.npz`` atomically: ``pool`` as ``mu`` / ``sigma``, ``spatial`` (if any) as ``mu_s`` /
    ``sigma_s``, and the record of how they were made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": pool["mu"], "sigma": pool["sigma"]}
    if spatial is not None:
        arrays.update(mu_s=spatial["mu"], sigma_s=spatial["sigma"])
    return savez_atomically(path, **arrays, feature_extractor=feature_extractor, weights_sha256=weights_sha256,
                            count=np.int64(count), source_sha256=source_sha256)
