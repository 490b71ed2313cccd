"""The repository's command-line scripts (``train.py``, ``sample.py``, ``extract_latents.py``) as the command
modules they run, for tests that call their ``main`` in-process or patch what it uses."""
import importlib

from helpers.repo import REPO

#: Each script of the checkout -> the command module it runs (``dit_gspn/commands/``).
COMMANDS = {"train": "dit_gspn.commands.train", "sample": "dit_gspn.commands.sample",
            "extract_latents": "dit_gspn.commands.extract"}


def load_script(name: str):
    """The command module that ``<name>.py`` of the repository runs (its ``main`` is what the command does)."""
    assert f"from {COMMANDS[name]} import" in (REPO / f"{name}.py").read_text()
    return importlib.import_module(COMMANDS[name])
