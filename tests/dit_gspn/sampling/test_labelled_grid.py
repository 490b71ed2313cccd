"""dit_gspn.sampling.labelled_grid: the tiles at their size, enlarged, each with its caption."""
import numpy as np
import pytest
import torch
from PIL import Image

from dit_gspn.sampling import save_labelled_grid


def test_labelled_grid_writes_tiles_and_captions(tmp_path):
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    path = save_labelled_grid(images, [0, 1, 2, 3, 4], tmp_path / "grid.png",
                              class_names=["zero", "one", "two", "three", "four"], nrow=3)
    grid = np.asarray(Image.open(path))
    # 32x32 tiles are enlarged 3x to stay readable: 3 columns, 2 rows of 96x96 tiles plus caption strips.
    assert grid.shape[1] == 3 * (96 + 4) and grid.shape[0] == 2 * (96 + 16 + 4)
    first = grid[2:98, 2:98]
    expected = ((images[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first[::3, ::3], expected)
    caption = grid[98:114, 2:98]
    assert (caption < 128).any(), "no caption text drawn under the first tile"
    with pytest.raises(ValueError, match="class id 7 has no name"):
        save_labelled_grid(images[:1], [7], tmp_path / "bad.png", class_names=["a"])
