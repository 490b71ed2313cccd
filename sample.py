"""``python sample.py ...``: the command ``dit-gspn-sample`` as the checkout's script (``dit_gspn/commands/sample.py``)."""
import sys

from dit_gspn.commands.sample import main, run  # noqa: F401 (main: the command itself, as tests call it)

if __name__ == "__main__":
    sys.exit(run())
