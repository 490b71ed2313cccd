"""``python train.py ...``: the command ``dit-gspn-train`` as the checkout's script (``dit_gspn/commands/train.py``)."""
import sys

from dit_gspn.commands.train import main, run  # noqa: F401 (main: the command itself, as tests call it)

if __name__ == "__main__":
    sys.exit(run())
