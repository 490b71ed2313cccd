"""The class folders that the image-folder and extraction tests read."""
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Two classes of random JPEG/PNG images, plus one corrupt .jpg and one text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(5):
            arr = rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root
