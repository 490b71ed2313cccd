"""The provenance file beside a sample ``.npz``: how its samples were drawn, for the evaluation report to copy.

``samples.npz`` gets ``samples.provenance.json``: the checkpoint (path, sha256, which weights, zoo name), its
objective, the sampler and its settings (steps, CFG scale, guided channels), seed, count, class mode, image
size, VAE, and the versions of Python, torch, diffusers and dit_gspn that drew them.
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from dit_gspn.atomic_write import write_text_atomically

SUFFIX = ".provenance.json"


def provenance_path(npz: str | Path) -> Path:
    """``samples.npz`` -> ``samples.provenance.json`` beside it."""
    npz = Path(npz)
    return npz.with_name(npz.stem + SUFFIX)


def versions() -> dict[str, str]:
    import diffusers
    import torch

    import dit_gspn

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "dit_gspn": dit_gspn.__version__}


def write_provenance(npz: str | Path, settings: dict, count: int) -> Path:
    """Write ``npz``'s provenance file (atomically): ``settings`` plus the count, versions and the time."""
    path = provenance_path(npz)
    record = dict(settings, samples=Path(npz).name, count=int(count), versions=versions(),
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return write_text_atomically(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_provenance(npz: str | Path) -> dict | None:
    """The provenance record beside ``npz``, None if there is none; an unreadable one says so in its place."""
    path = provenance_path(npz)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"unreadable": f"{path}: {type(err).__name__}: {err}"}
