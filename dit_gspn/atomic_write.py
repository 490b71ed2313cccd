"""Writing a file so that a reader (or a kill) sees the old file or the whole new one, never a part.

    with atomic_write(path) as tmp:      # tmp: a Path beside ``path``, ``.<name>.tmp<pid>``
        canvas.save(tmp, format="PNG")   # any writer that takes a path, or open(tmp, "wb")
    write_text_atomically(path, text)    # the same for a text file
    savez_atomically(path, *arrays)      # and for np.savez

The temporary file is flushed to disk and renamed over ``path`` (``os.replace``, atomic on one file
system) only when the block ends without an exception; otherwise it is removed and ``path`` keeps what
it held. A full disk is a ``DiskFullError``, one line naming the folder (``is_disk_full`` says which errors
are one). (A folder that is swapped as a whole, such as a training checkpoint, has its own renames:
``dit_gspn.checkpoint.folder``.)
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from dit_gspn.errors import UserError

#: Free bytes below which a failed write is taken for a full disk (the partial file still takes the rest).
NEARLY_FULL = 4 << 20


class DiskFullError(UserError, OSError):
    """The disk (or the quota) filled up during a write; the partial file was removed, the old one kept."""


def is_disk_full(err: BaseException | None, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (or an error it came from) was a full disk or quota: an OSError's errno, the message that
    safetensors gives, or (torch.save says only "unexpected pos ...") under ``NEARLY_FULL`` bytes left on
    ``folder``'s file system."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(err) for s in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        err = err.__cause__ or err.__context__
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def temporary_sibling(path: Path) -> Path:
    """The temporary file ``atomic_write`` writes ``path`` through: hidden, beside it, unique per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    On an exception inside the block the temporary file is removed, ``path`` is left as it was, and the
    exception propagates; a full disk as a ``DiskFullError``. The parent folder must exist.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and not isinstance(err, UserError) and is_disk_full(err, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"no space left on {path.parent} while writing {path.name}: the partial file was "
                                f"removed and the files written before it are kept; free space there and run the "
                                f"command again") from err
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` with ``atomic_write``; returns ``path``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def savez_atomically(path: str | os.PathLike, *arrays, **named) -> Path:
    """``np.savez(path, *arrays, **named)`` with ``atomic_write`` (and no ``.npz`` appended to the name)."""
    import numpy as np

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, *arrays, **named)
    return Path(path)


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike, advice: str = "") -> Iterator[None]:
    """Inside the block, a write that fails for want of space (``is_disk_full``) raises ``DiskFullError("no space
    left on <path>: ...")`` with ``advice``; other errors pass unchanged. (``atomic_write`` does this itself.)"""
    try:
        yield
    except Exception as err:
        if isinstance(err, UserError) or not is_disk_full(err):
            raise
        raise DiskFullError(f"no space left on {path}{'; ' + advice if advice else ''}") from err
