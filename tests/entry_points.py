"""The repository's command-line scripts (``train.py``, ``sample.py``, ...) as modules, for tests that call
their ``main`` in-process (what the command does after its imports)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """The entry point ``<name>.py`` of the repository as a module (its ``main`` is what the command runs)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
