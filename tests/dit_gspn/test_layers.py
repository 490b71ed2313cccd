"""No part of the project imports one above it (imports inside functions count too): the layers of dit_gspn bottom to
top, then the evaluation jobs and the entry scripts (train.py, sample.py, extract_latents.py) on top of the whole
package, then benchmarks/, which may import anything and which nothing imports."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.repo import REPO


#: dit_gspn's layers, bottom to top; a module may import its own layer and those before it.
LAYERS = [
    {"errors", "cli", "hashing", "sizes", "seeding", "atomic_write", "folder_lock", "resources", "host_memory",
     "registry", "image_npz", "work_folder", "module_file"},
    {"ops"},
    {"models"},
    {"diffusion", "vae"},
    {"checkpoint", "data"},
    {"metrics"},
    {"sampling"},
    {"training"},
    {"commands"},
]
ENTRY_SCRIPTS = ("train", "sample", "extract_latents")
#: Above every layer of dit_gspn: the evaluation jobs' command line and the entry scripts, then the benchmarks.
TOP, BENCHMARKS = len(LAYERS), len(LAYERS) + 1


def _unit(module: str) -> str | None:
    """The part of the project a dotted module name belongs to (``dit_gspn.<top>``, ``evaluation``, ``benchmarks``
    or an entry script), or None for anything else (the bare package ``dit_gspn`` included)."""
    parts = module.split(".")
    if parts[0] == "dit_gspn":
        return f"dit_gspn.{parts[1]}" if len(parts) > 1 else None
    return parts[0] if parts[0] in ("evaluation", "benchmarks", *ENTRY_SCRIPTS) else None


def _rank(unit: str) -> int:
    if unit.startswith("dit_gspn."):
        part = unit.split(".", 1)[1]
        return next(i for i, layer in enumerate(LAYERS) if part in layer)
    return BENCHMARKS if unit == "benchmarks" else TOP


def _own_unit(path: Path, root: Path = REPO) -> str | None:
    parts = path.relative_to(root).with_suffix("").parts
    return None if parts == ("dit_gspn", "__init__") else _unit(".".join(parts))


def _project_imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, unit) of every import of a project module in ``path``, relative imports resolved."""
    package = list(path.relative_to(root).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names = ([".".join([*base, node.module])] if node.module else
                         [".".join([*base, a.name]) for a in node.names])
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, unit) for unit in map(_unit, names) if unit is not None]
    return found


def _files() -> list[Path]:
    files = [p for p in (REPO / "dit_gspn").rglob("*.py") if "csrc" not in p.parts]
    files += [*(REPO / "evaluation").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    return sorted(files) + [REPO / f"{name}.py" for name in ENTRY_SCRIPTS]


def test_every_module_of_dit_gspn_is_in_a_layer():
    tops = {p.relative_to(REPO / "dit_gspn").parts[0].removesuffix(".py") for p in (REPO / "dit_gspn").rglob("*.py")
            if "csrc" not in p.parts} - {"__init__"}
    assert tops <= set().union(*LAYERS)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_imports_a_part_above_its_own(path):
    own = _own_unit(path)
    if own is None:
        return
    above = [f"line {line}: {unit}" for line, unit in _project_imports(path) if _rank(unit) > _rank(own)]
    assert not above, f"{path.relative_to(REPO)} ({own}) imports from above: {above}"


def test_the_check_sees_an_upward_import(tmp_path):
    fake = tmp_path / "dit_gspn"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("def f():\n    from dit_gspn.sampling import sample\n"
                                        "from ..training import config\nimport evaluation.reference\n")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "y.py").write_text("from benchmarks import timing\nfrom .reference import main\n")
    data = _project_imports(fake / "data" / "x.py", tmp_path)
    assert sorted(data) == [(2, "dit_gspn.sampling"), (3, "dit_gspn.training"), (4, "evaluation")]
    assert all(_rank(unit) > _rank(_own_unit(fake / "data" / "x.py", tmp_path)) for _, unit in data)
    top = _project_imports(tmp_path / "evaluation" / "y.py", tmp_path)
    assert sorted(top) == [(1, "benchmarks"), (2, "evaluation")]
    assert _rank("benchmarks") > _rank(_own_unit(tmp_path / "evaluation" / "y.py", tmp_path)) == _rank("evaluation")
