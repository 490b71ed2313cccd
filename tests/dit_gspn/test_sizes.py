"""dit_gspn.sizes.size_pair: the one reading of "an int or an (H, W) pair"."""
from __future__ import annotations

import numpy as np
import pytest

from dit_gspn.errors import UserError
from dit_gspn.sizes import size_pair


@pytest.mark.parametrize("seed", range(5))
def test_an_int_is_a_square_and_a_pair_is_height_then_width(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 4096, size=2))
    assert size_pair(height) == (height, height)
    assert size_pair((height, width)) == (height, width)
    assert size_pair([height, width]) == (height, width)  # as config.json / YAML give it back
    got = size_pair((np.int64(height), np.int32(width)))
    assert got == (height, width) and all(type(side) is int for side in got)


@pytest.mark.parametrize("bad", [True, 32.0, "32", (8,), (8, 8, 8), (8.0, 8), None, (8, None), [8, "8"]])
def test_anything_else_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=r"^model.input_size must be an int or an \(H, W\) pair of ints, got "):
        size_pair(bad, "model.input_size")


@pytest.mark.parametrize("bad", [0, -3, (4, 0), (-1, 4)])
def test_a_side_below_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"^image_size must be at least 1 on each side"):
        size_pair(bad, "image_size")


def test_the_caller_chooses_the_error_class():
    class CheckpointLikeError(UserError, ValueError):
        pass

    with pytest.raises(CheckpointLikeError, match=r"^run/sampling.json: image_size must be"):
        size_pair("256", "run/sampling.json: image_size", CheckpointLikeError)
