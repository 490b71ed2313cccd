"""How every command-line entry point runs: its plugins imported, a user's mistake as one line ``error: ...``
with no traceback, the checks of the paths it is given.

A mistake the user can fix (a wrong key, file, value or class) is raised as a ``dit_gspn.errors.UserError``
(or a subclass: ``ConfigError``, ``ShardError``, ``CheckpointError``, ...) whose message names what is wrong
and what would be right. ``run_main`` prints it as one line and exits with ``USER_ERROR``; any other
exception is a bug of ours and keeps its traceback. ``--debug`` or ``DIT_GSPN_DEBUG=1`` shows the
traceback of a user error too.

    from dit_gspn.cli import ArgumentParser, command
    def main(argv=None) -> int: ...
    run = command(main)        # the console script (pyproject.toml) and ``python -m``'s entry point
    if __name__ == "__main__":
        sys.exit(run())
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from dit_gspn.errors import MissingFileError, OutputExistsError, UserError

DEBUG_ENV = "DIT_GSPN_DEBUG"
#: Modules every command imports first (comma-separated), so that what they register is known to it.
PLUGINS_ENV = "DIT_GSPN_PLUGINS"
#: The exit code of a user's mistake (argparse's own code for bad arguments).
USER_ERROR = 2
#: The largest image side (pixels) a command takes: beyond any model here, so that a typo such as 10**12 is
#: refused before anything of that size is allocated.
MAX_IMAGE_SIDE = 16384
#: The largest seed: seeds are recorded as 64-bit signed integers (torch's and NumPy's seed type).
MAX_SEED = 2**63 - 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag, whose mistakes are ``UserError``s (one line, not usage + error)."""

    def __init__(self, *args, module: str | None = None, **kwargs):
        # ``python -m <module>`` runs a .py file: name the command as typed (a console script names itself).
        if module is not None and "prog" not in kwargs and sys.argv[0].endswith(".py"):
            kwargs["prog"] = f"python -m {module}"
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def int_range(least: int, most: int | None = None):
    """An argparse ``type=`` for an integer in [least, most] (``most`` None: no upper bound); any other value is
    argparse's one-line error, e.g. ``argument --seed: must be an integer >= 0 and <= 2**63 - 1, got -1``."""
    shown = "2**63 - 1" if most == MAX_SEED else most

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}"
                                             + (f" and <= {shown}" if most is not None else "") + f", got {value}")
        return value

    return integer


def file_in_the_way(path) -> Path | None:
    """The file (not folder) among ``path``'s parents that keeps ``path`` from being created, if any."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def unwritable_reason(folder) -> str | None:
    """Why no file can be created in the existing ``folder`` (None if one can): a file is made and removed, which
    also finds a read-only file system and permissions that ``os.access`` would miss for root."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
            return None
    except OSError as err:
        return err.strerror or str(err)


def _check_location(path: Path, flag: str) -> None:
    """``path`` can be created: no file in the way and its nearest existing folder writable."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise OutputExistsError(f"{flag} {path}: {blocker} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    why = unwritable_reason(existing)
    if why is not None:
        raise UserError(f"{flag} {path}: {existing} cannot be written ({why}); choose another location")


def check_output_file(path, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: an existing folder at ``path``, a file
    among its parents, or a nearest existing folder that cannot be written (read-only, no permission). Missing
    folders are fine (the writer makes them); nothing is created here."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder, not a file; name a file in it")
    _check_location(path.parent if path.exists() else path, flag)


def check_output_folder(path, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be made or written: a file at ``path`` or among its
    parents, or a nearest existing folder that cannot be written. Nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a file, not a folder")
    _check_location(path, flag)


def check_input_file(path, what: str) -> Path:
    """``path`` as a Path if it is an existing file; else a one-line error saying that it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    return path


def check_input_folder(path, what: str) -> Path:
    """``path`` as a Path if it is an existing folder; else a one-line error saying that it is missing or a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    if not path.is_dir():
        raise MissingFileError(f"{what} {path} does not exist")
    return path


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
        # One write of the whole line: the processes of a launch refusing at once do not interleave their lines.
        sys.stderr.write(f"error: {one_line(err)}\n")
        sys.stderr.flush()
        return USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


def import_plugins() -> list[str]:
    """Import the modules ``$DIT_GSPN_PLUGINS`` names (comma-separated: ``my_project.mixers,my_project.data``), so
    that the mixers, samplers, dataset kinds, objectives and model families they register are known to the
    command; returns their names. A module that cannot be imported is a ``UserError`` naming it."""
    import importlib

    names = [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"{PLUGINS_ENV}: cannot import {name!r} ({err}); put its folder on PYTHONPATH or "
                            f"install it") from err
    return names


def command(main):
    """The entry point of a command whose ``main(argv=None)`` returns its exit code: the plugins imported
    (``import_plugins``), ``run_main`` (a user's mistake as one line), and in a launch of several processes
    (``WORLD_SIZE`` > 1) an exit at once after the process group is destroyed, since gloo workers can abort at
    interpreter exit even after ``destroy_process_group``. Every entry point is one: the console scripts,
    ``python -m``, and the checkout's ``train.py`` and friends."""

    def with_plugins(argv):
        import_plugins()
        return main(argv)

    def run(argv=None) -> int:
        code = run_main(with_plugins, argv)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    run.__doc__ = f"Run ``{main.__module__}.main`` as a command (``dit_gspn.cli.command``)."
    return run
