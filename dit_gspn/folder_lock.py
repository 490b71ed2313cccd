"""One command at a time in a folder: a lock that names its holder and that dies with it.

    lock_folder(run_dir, "a training run")   # this process holds <run_dir>/.lock ...
    release_folder(run_dir)                  # ... until it lets go (train and extract_latents do) or exits
    with holding(shard_dir, "sampling"): ... # the same, for one block
    decide_on_main_process(state, check)     # the main process checks; every process raises its refusal

The lock is ``flock`` on ``<folder>/.lock``, a file that also says which process holds it, so a second command
on the same folder is refused with one line naming the first one's pid (``FolderInUseError``), and a lock left
by a killed process blocks nothing: the kernel dropped it with the process. A process may take the same
folder's lock again (a second run in one Python session). The processes of one ``accelerate launch`` are one
command: only the main process takes the lock, inside ``decide_on_main_process``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from dit_gspn.errors import UserError

LOCK_FILE = ".lock"

#: The folders this process holds (by resolved path) and their open lock files: closing one releases it.
_held: dict[str, object] = {}


class FolderInUseError(UserError):
    """Another process holds the folder: two commands writing one folder would spoil each other's files."""


def lock_folder(folder: str | os.PathLike, what: str = "a command") -> Path:
    """Hold ``folder``'s lock for this process until ``release_folder`` or its exit (the folder must exist); a
    ``FolderInUseError`` naming the holder's pid when another process has it. Returns the lock file."""
    folder = Path(folder)
    key = str(folder.resolve())
    path = folder / LOCK_FILE
    if key in _held:
        return path
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUseError(f"{folder} is in use by {holder} ({what} there has not ended); wait for it or stop "
                               f"it: two commands writing one folder would spoil each other's files") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[key] = handle
    return path


@contextlib.contextmanager
def holding(folder: str | os.PathLike, what: str = "a command") -> Iterator[Path]:
    """``folder``'s lock (the folder made if missing) for the duration of the block, as ``lock_folder``; let go
    at its end unless this process held it already."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = str(folder.resolve()) not in _held
    path = lock_folder(folder, what)
    try:
        yield path
    finally:
        if taken:
            release_folder(folder)


def release_folder(folder: str | os.PathLike) -> None:
    """Let go of ``folder``'s lock if this process holds it."""
    handle = _held.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        handle.close()


class MainProcessFailed(RuntimeError):
    """Raised on the other processes of a launch when ``check()`` failed on the main process with an error that
    is not a user's mistake (that one keeps its traceback on the main process)."""


def decide_on_main_process(state, check) -> None:
    """Run ``check()`` on the main process of ``state`` (an ``accelerate`` state or ``Accelerator``) only. Any
    exception it raises stops every process, so that none waits at a barrier for a main process that has
    stopped: the main process re-raises its own, the others raise the same ``UserError`` (one line each) or,
    for any other exception, ``MainProcessFailed`` naming it. (A lock taken inside ``check`` is the whole
    launch's.)"""
    own, outcome = None, None  # outcome: None, ("refusal", type, message) or ("failure", type name, message)
    if state.is_main_process:
        try:
            check()
        except BaseException as err:  # noqa: BLE001 (every process must learn of it before it is raised)
            own = err
            outcome = (("refusal", type(err), str(err)) if isinstance(err, UserError)
                       else ("failure", type(err).__name__, str(err)))
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if own is not None:
        raise own
    if outcome is not None:
        kind, cls, message = outcome
        if kind == "refusal":
            raise cls(message)
        raise MainProcessFailed(f"the main process stopped with {cls}: {message}")
