"""A folder of resumable work (batch sampling's shards, a reference's chunks): the settings it was made with.

``check_manifest``: the folder's ``run.json`` records the settings of its first run; a later run with other
settings is refused, so that parts made two ways are never mixed. (One process at a time works in such a folder:
``dit_gspn.folder_lock``; a full disk is one line: ``dit_gspn.atomic_write.reporting_full_disk``.)
"""
from __future__ import annotations

import json
from pathlib import Path

from dit_gspn.atomic_write import write_text_atomically
from dit_gspn.errors import UserError

MANIFEST = "run.json"


class WorkFolderError(UserError, ValueError):
    """A work folder that this run cannot continue: it holds parts made with other settings."""


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
