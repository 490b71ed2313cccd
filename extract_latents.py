"""``python extract_latents.py ...``: the command ``dit-gspn-extract`` as the checkout's script (``dit_gspn/commands/extract.py``)."""
import sys

from dit_gspn.commands.extract import main, run  # noqa: F401 (main: the command itself, as tests call it)

if __name__ == "__main__":
    sys.exit(run())
