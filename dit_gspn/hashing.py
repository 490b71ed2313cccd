"""sha256 of a file or of a folder's files: how inputs, checkpoints and samples are identified in reports."""
from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of the file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(root: str | Path, files) -> str:
    """One hex sha256 over ``files`` (under ``root``) in the order given: each relative path and its sha256."""
    root = Path(root)
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(Path(file).relative_to(root)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """A file's sha256, or for a folder the sha256 over its files (recursively, sorted, hidden ones skipped)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sha256_files(path, files)
