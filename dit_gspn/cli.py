"""How every command-line entry point reports a user's mistake: one line ``error: ...``, no traceback.

A mistake the user can fix (a wrong key, file, value or class) is raised as a ``UserError`` (or a
subclass: ``ConfigError``, ``ShardError``, ``CheckpointError``, ...) whose message names what is wrong
and what would be right. ``run_main`` prints it as one line and exits with ``USER_ERROR``; any other
exception is a bug of ours and keeps its traceback. ``--debug`` or ``DIT_GSPN_DEBUG=1`` shows the
traceback of a user error too.

    from dit_gspn.cli import ArgumentParser, run_main
    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        sys.exit(run_main(main))
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

DEBUG_ENV = "DIT_GSPN_DEBUG"
#: The exit code of a user's mistake (argparse's own code for bad arguments).
USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong and what would be right, in one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command needs) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output the command would write already exists, and overwriting it could lose work."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag, whose mistakes are ``UserError``s (one line, not usage + error)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def file_in_the_way(path) -> Path | None:
    """The file (not folder) among ``path``'s parents that keeps ``path`` from being created, if any."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def check_output_path(path, flag: str = "--out") -> None:
    """Refuse an output path under a file, before any work: ``OutputExistsError`` naming the file."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise OutputExistsError(f"{flag} {path}: {blocker} is a file, not a folder")


def _check_writable_folder(folder: Path, flag: str, shown) -> None:
    """Refuse ``shown`` if ``folder`` (existing or to be made) cannot hold it: a file at or above ``folder``, or
    a nearest existing folder that cannot be written."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputExistsError(f"{flag} {shown}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{flag} {shown}: {existing} is not writable (read-only, or not yours); choose a "
                                f"writable location")


def check_output_file(path, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written: a folder of that name, a file among
    its parents, a read-only location. Missing parent folders are fine (they are made when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder; name a file (in it, or elsewhere)")
    _check_writable_folder(path.absolute().parent, flag, path)


def check_output_folder(path, flag: str) -> None:
    """Refuse, before any work, an output folder that could not be made or written: a file of that name, a
    file among its parents, a read-only location."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a file, not a folder")
    _check_writable_folder(path.absolute(), flag, path)


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so that an error stays one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def run_main(main, argv=None) -> int:
    """``main(argv)``'s exit code; a ``UserError`` becomes ``error: <message>`` on stderr and ``USER_ERROR``."""
    try:
        return main(argv)
    except UserError as err:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
