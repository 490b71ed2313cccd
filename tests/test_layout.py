"""The README's Layout section matches the tree: every module is named in its table, every path it names exists."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dit_gspn", "evaluation")


def _layout_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Layout\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def _table_paths(section: str) -> set[str]:
    """The backticked names in the first column of the section's table."""
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def _modules() -> set[str]:
    return {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
            if p.name != "__init__.py" and "csrc" not in p.parts and "configs" not in p.parts}


def test_every_module_has_a_row():
    missing = sorted(_modules() - _table_paths(_layout_section()))
    assert not missing, f"README's Layout table does not name: {missing}"


def _paths_that_do_not_exist(section: str) -> list[str]:
    """The paths of the tree (under a top-level folder, or a top-level .py / .toml) that ``section`` names but the
    checkout lacks; glob patterns and paths relative to another folder are not checked."""
    tops = "|".join(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith("."))
    named = {name for name in re.findall(r"`([^`\s*]+)`", section)
             if re.match(rf"({tops})/", name) or re.fullmatch(r"\w+\.(py|toml)", name)}
    return sorted(name for name in named if not (REPO / name.rstrip("/")).exists())


def test_every_path_the_section_names_exists():
    gone = _paths_that_do_not_exist(_layout_section())
    assert not gone, f"README's Layout section names paths that do not exist: {gone}"


def test_the_check_sees_a_missing_row():
    section = "\n## Layout\n| path | what |\n| --- | --- |\n| `dit_gspn/vae.py` | the VAE |\n"
    assert _table_paths(section) == {"dit_gspn/vae.py"}
    assert "dit_gspn/sizes.py" in _modules() - _table_paths(section)
    assert _paths_that_do_not_exist(section + "| `dit_gspn/vea.py` | a typo |\n") == ["dit_gspn/vea.py"]
