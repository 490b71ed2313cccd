"""The checkout the tests run from: its scripts, presets and sources by path."""
from pathlib import Path

#: The repository's root (where train.py, sample.py, configs/ and csrc/ are).
REPO = Path(__file__).resolve().parents[2]
