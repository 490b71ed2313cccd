"""Where the folders the package ships as data live: ``csrc/`` (the kernel sources) and ``configs/`` (the presets).

In a checkout they are the top-level folders users know (``csrc/``, ``configs/demo.yaml``). An installed
wheel carries them as package data inside the package (``dit_gspn/csrc``, ``dit_gspn/configs``: setup.py
maps the top-level folders there), and that copy wins when it exists.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_folder(name: str) -> Path:
    """The shipped folder ``name`` ("csrc" or "configs"): the installed package's copy, else the checkout's."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


#: The C++/CUDA sources of the compiled scan kernels.
CSRC = data_folder("csrc")
#: The YAML presets (``demo.yaml``, the XL/2 ones).
CONFIGS = data_folder("configs")
