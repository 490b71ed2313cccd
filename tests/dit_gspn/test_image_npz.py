"""dit_gspn.image_npz: the ADM layout (arr_0 uint8 images, arr_1 labels) written and read back."""
import errno

import numpy as np
import pytest

from dit_gspn.atomic_write import DiskFullError
from dit_gspn.image_npz import ImageNpzWriter, read_npz, write_npz


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


@pytest.mark.parametrize("with_labels", [True, False])
def test_a_streamed_npz_is_byte_for_byte_np_savez_and_leaves_only_itself(tmp_path, with_labels):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    arrays = (images, labels) if with_labels else (images,)
    with open(tmp_path / "savez.npz", "wb") as file:
        np.savez(file, *arrays)
    out = tmp_path / "out" / "streamed.npz"
    with ImageNpzWriter(out, 7, 5, 6) as writer:
        for part in (slice(0, 3), slice(3, 4), slice(4, 7)):
            writer.append(images[part], labels[part] if with_labels else None)
    assert out.read_bytes() == (tmp_path / "savez.npz").read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["streamed.npz"]


def test_a_full_disk_while_streaming_is_one_disk_full_error_and_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "samples.npz"
    out.write_bytes(b"the old samples")
    images = np.zeros((4, 2, 2, 3), np.uint8)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path} while writing samples.npz") as info:
        with ImageNpzWriter(out, 4, 2, 2) as writer:
            writer.append(images[:2])
            raise full
    assert info.value.__cause__ is full
    assert out.read_bytes() == b"the old samples" and [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_a_writer_that_fails_to_start_leaves_no_temporary(tmp_path, monkeypatch):
    def no_header(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", no_header)
    with pytest.raises(OSError, match="Input/output error"):
        with ImageNpzWriter(tmp_path / "samples.npz", 4, 2, 2):
            pass
    assert list(tmp_path.iterdir()) == []
