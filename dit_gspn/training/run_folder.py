"""The run folder's first check: every folder a run writes to can be written, before any work."""
from __future__ import annotations

from pathlib import Path

from dit_gspn.cli import file_in_the_way, unwritable_reason

from .config import ConfigError


def check_writable(folders) -> None:
    """Create each folder and check that a file can be written into it (``cli.unwritable_reason``), or raise a
    ConfigError naming the folder that fails."""
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            why = unwritable_reason(folder)
        except OSError as err:
            why = err.strerror or str(err)
        if why is None:
            continue
        what = "is a file, not a folder" if folder.is_file() else f"cannot be written ({why})"
        blocker = file_in_the_way(folder)
        if blocker is not None:
            what = f"cannot be created: {blocker} is a file, not a folder"
        raise ConfigError(f"{folder} {what}; the run writes there. Choose another run_dir or fix it before training")
