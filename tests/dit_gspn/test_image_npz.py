"""dit_gspn.image_npz: the ADM layout (arr_0 uint8 images, arr_1 labels) written and read back."""
import numpy as np
import pytest

from dit_gspn.image_npz import read_npz, write_npz


def test_npz_layout_round_trips_and_adm_reads_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 12, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9])
    path = write_npz(tmp_path / "s.npz", images, labels)
    got, got_labels = read_npz(path)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    with np.load(path) as raw:  # what ADM's evaluator and sample script see
        assert raw.files == ["arr_0", "arr_1"] and raw["arr_0"].dtype == np.uint8
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        write_npz(tmp_path / "bad.npz", images.astype(np.float32))
