"""A folder of resumable work (batch sampling's shards, a reference's chunks): the settings it was made with, the
process that works in it, and a full disk said as such.

- ``check_manifest``: the folder's ``run.json`` records the settings of its first run; a later run with other
  settings is refused, so that parts made two ways are never mixed.
- ``FolderLock``: one process at a time works in the folder (``fcntl.flock`` on ``<folder>/lock``, the holder's
  pid written inside for the message). The kernel drops the lock when its process ends, however it ends, so a
  killed run never blocks the next one.
- ``full_disk_is_a_user_error``: ``ENOSPC`` / ``EDQUOT`` while writing become one line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from dit_gspn.atomic_write import write_text_atomically
from dit_gspn.cli import UserError

MANIFEST = "run.json"
LOCK = "lock"


class WorkFolderError(UserError, ValueError):
    """A work folder that this run cannot continue: other settings, another process in it, a full disk."""


def check_manifest(folder: Path, settings: dict, write: bool, defaults: dict | None = None,
                   flag: str = "--out") -> None:
    """Refuse to mix parts made with other settings; ``write`` (one process) records them on first use.

    ``defaults``: settings added after the manifest's first version, with the value that means what their
    absence meant, so an older folder resumes with them at that value.
    """
    path = Path(folder) / MANIFEST
    if path.is_file():
        try:
            old = {**(defaults or {}), **json.loads(path.read_text())}
        except json.JSONDecodeError as err:
            raise WorkFolderError(f"{path} is not valid JSON ({err}); delete {folder} to start over") from err
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise WorkFolderError(f"{folder} holds parts made with other settings ({detail}); delete that "
                                  f"folder or choose another {flag}")
    elif write:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


class FolderLock:
    """An exclusive, non-blocking claim on ``folder`` by this process (``with FolderLock(folder, what):``).

    Another process holding it makes ``__enter__`` raise ``WorkFolderError`` naming ``what`` and that process's
    id. The claim ends when the block ends or the process dies.
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.path = Path(folder) / LOCK
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkFolderError(f"{self.what} is in use by process {holder} (its lock is {self.path}); wait "
                                  f"for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@contextlib.contextmanager
def full_disk_is_a_user_error(path: str | os.PathLike, advice: str = "") -> Iterator[None]:
    """Inside the block, a write that fails for want of space (``ENOSPC``, or ``EDQUOT``: a quota) raises
    ``WorkFolderError("no space left on <path>: ...")`` instead; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        why = "no space left on the device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        raise WorkFolderError(f"no space left on {path} ({why}){'; ' + advice if advice else ''}") from err
