"""A network saved to one file, for the user to pass by path (an evaluation feature extractor, REPA's encoder):
a ``torch.export`` program (``.pt2``), or a TorchScript file from before torch deprecated TorchScript.

``save_exported`` writes the first kind, with the batch dimension left dynamic; ``load_module`` reads either,
telling them apart by the records inside the zip (an exported program has ``archive_format``, a TorchScript file
``constants.pkl``), and keeps torch's TorchScript deprecation warning from the user, who cannot act on it.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from dit_gspn.atomic_write import atomic_write
from dit_gspn.errors import MissingFileError, UserError

EXPORTED, TORCHSCRIPT = "torch.export program", "TorchScript file"


class ModuleFileError(UserError, ValueError):
    """A file that is neither a ``torch.export`` program nor a TorchScript file, or does not load."""


class ExportedNetwork(nn.Module):
    """A ``torch.export`` program's module as an ordinary ``nn.Module`` in eval mode. ``train()`` and ``eval()``
    only record the mode: the program keeps the one it was exported in (torch refuses to switch it), which for
    ``save_exported``'s programs is eval."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program
        self.training = False

    def forward(self, *args):
        return self.program(*args)

    def train(self, mode: bool = True) -> "ExportedNetwork":
        self.training = mode
        return self


def save_exported(module: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """``module`` (in eval mode, without gradients) exported on ``example`` with a dynamic batch dimension and
    saved atomically as a ``torch.export`` program (``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f)
    return path


def module_kind(path: str | os.PathLike) -> str | None:
    """``EXPORTED``, ``TORCHSCRIPT``, or None for any other file, from the names of the records inside it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return EXPORTED
    if any(n.endswith("/constants.pkl") for n in names):
        return TORCHSCRIPT
    return None


def load_module(path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "module file") -> Callable:
    """The network in ``path`` on ``device``, ready to call: a ``torch.export`` program's module or a TorchScript
    module, in eval mode. ``what`` names the file's role in the messages (``--extractor``, ``repa.encoder``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    kind = module_kind(path)
    if kind is None:
        raise ModuleFileError(f"{what} {path} is neither a torch.export program (torch.export.save, .pt2) nor a "
                              f"TorchScript file (torch.jit.save)")
    try:
        if kind == EXPORTED:
            with open(path, "rb") as f:  # a file object: torch.export.load wants a .pt2 suffix on a path
                program = torch.export.load(f)
            if torch.device(device).type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            return ExportedNetwork(program.module())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ModuleFileError(f"{what} {path}: the {kind} does not load ({type(err).__name__}: {err})") from err
