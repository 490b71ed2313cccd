"""The run folder's first check: every folder a run writes to can be written, before any work."""
from __future__ import annotations

import os
from pathlib import Path

from dit_gspn.cli import file_in_the_way

from .config import ConfigError


def check_writable(folders) -> None:
    """Create each folder and write a file into it, or raise a ConfigError naming the folder that fails."""
    for folder in folders:
        folder = Path(folder)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            what = "is a file, not a folder" if folder.is_file() else f"cannot be written ({err.strerror})"
            blocker = file_in_the_way(folder)
            if blocker is not None:
                what = f"cannot be created: {blocker} is a file, not a folder"
            raise ConfigError(f"{folder} {what}; the run writes there. Choose another run_dir or fix it "
                              f"before training") from err
