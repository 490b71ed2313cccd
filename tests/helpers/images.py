"""Class folders of image files, for the tests that read them."""
from pathlib import Path

import numpy as np
from PIL import Image


def image_folder(root: Path, classes: dict) -> Path:
    """``root/<class>/<i>.png``: ``count`` random 16x16 RGB images for each class of ``classes`` (name -> count)."""
    rng = np.random.default_rng(5)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root
