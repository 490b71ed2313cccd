"""No layer of dit_gspn imports one above it (imports inside functions count too)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dit_gspn"

#: Bottom to top; a module may import its own layer and those before it.
LAYERS = [
    {"cli", "hashing", "sizes", "seeding", "atomic_write", "folder_lock", "resources", "host_memory", "registry"},
    {"ops"},
    {"models"},
    {"diffusion", "vae"},
    {"checkpoint", "data"},
    {"sampling"},
    {"training"},
    {"commands"},
]


def _layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def _dit_gspn_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first part below dit_gspn) of every import of a dit_gspn module in ``path``."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # how many folders below dit_gspn the file is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = list(path.relative_to(PACKAGE).parts[:-1])[:depth - node.level + 1]
                module = ".".join(["dit_gspn", *base, *([node.module] if node.module else [])])
                names = [module] if node.module or base else [f"dit_gspn.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dit_gspn" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)


def test_every_module_is_in_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert tops <= set().union(*LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if own == "__init__":
        return
    above = [f"line {line}: dit_gspn.{part}" for line, part in _dit_gspn_imports(path)
             if _layer_of(part) > _layer_of(own)]
    assert not above, f"{path.relative_to(PACKAGE)} (layer {own}) imports from above: {above}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "dit_gspn"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("def f():\n    from dit_gspn.sampling import sample\n"
                                        "from ..training import config\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert sorted(_dit_gspn_imports(fake / "data" / "x.py")) == [(2, "sampling"), (3, "training")]
