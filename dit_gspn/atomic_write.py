"""Writing a file so that a reader (or a kill) sees the old file or the whole new one, never a part.

    with atomic_write(path) as tmp:      # tmp: a Path beside ``path``, ``.<name>.tmp<pid>``
        canvas.save(tmp, format="PNG")   # any writer that takes a path, or open(tmp, "wb")
    write_text_atomically(path, text)    # the same for a text file
    savez_atomically(path, *arrays)      # and for np.savez

The temporary file is flushed to disk and renamed over ``path`` (``os.replace``, atomic on one file
system) only when the block ends without an exception; otherwise it is removed and ``path`` keeps what
it held. (A folder that is swapped as a whole, such as a training checkpoint, has its own renames:
``dit_gspn.checkpoint.folder``.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: Path) -> Path:
    """The temporary file ``atomic_write`` writes ``path`` through: hidden, beside it, unique per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    On an exception inside the block the temporary file is removed, ``path`` is left as it was, and the
    exception propagates. The parent folder must exist.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
