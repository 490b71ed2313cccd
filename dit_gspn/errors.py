"""The project's errors that a user can fix: one class per kind of mistake, each message naming what is wrong and
what would be right. A command line prints them as one ``error: ...`` line (``dit_gspn.cli.run_main``); any
other exception is a bug of ours and keeps its traceback. Library code raises these (or subclasses:
``ConfigError``, ``ShardError``, ``CheckpointError``, ...) wherever a user's input is refused.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong and what would be right, in one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command needs) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output the command would write already exists, and overwriting it could lose work."""
