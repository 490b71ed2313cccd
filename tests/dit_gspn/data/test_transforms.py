"""dit_gspn.data.transforms: ADM's centre crop keeps the centre and gives the size asked for."""
import numpy as np
from PIL import Image

from dit_gspn.data import center_crop_arr


SIZE = 16


def test_center_crop_arr_keeps_the_centre_and_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    arr[14:26, 29:41] = (255, 0, 0)  # a red square at the centre
    out = center_crop_arr(Image.fromarray(arr), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert (out[6:10, 6:10, 0] > 200).all() and (out[6:10, 6:10, 1:] < 60).all()
    exact = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(exact), SIZE), exact)
