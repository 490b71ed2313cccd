"""dit_gspn.atomic_write: a write that fails midway leaves the old file and no temporary file."""
from __future__ import annotations

import numpy as np
import pytest

from dit_gspn.atomic_write import atomic_write, savez_atomically, temporary_sibling, write_text_atomically


def _folder_names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failure):
    path = tmp_path / "index.json"
    path.write_text("old content")
    with pytest.raises(type(failure)):
        with atomic_write(path) as tmp:
            tmp.write_text("half of the new con")
            assert path.read_text() == "old content"  # nothing is visible before the block ends
            raise failure
    assert path.read_text() == "old content"
    assert _folder_names(tmp_path) == {"index.json"}


def test_a_write_that_fails_before_creating_the_temporary_raises_its_own_error(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="bad value"):
        with atomic_write(path):
            raise ValueError("bad value")
    assert _folder_names(tmp_path) == set()


def test_a_write_that_ends_replaces_the_file_and_leaves_only_it(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "shard-00000.npz"
    path.write_bytes(b"previous shard")
    images = rng.integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=3)
    assert savez_atomically(path, images=images, labels=labels) == path
    assert _folder_names(tmp_path) == {"shard-00000.npz"}  # np.savez would append .npz to a bare path
    with np.load(path) as data:
        np.testing.assert_array_equal(data["images"], images)
        np.testing.assert_array_equal(data["labels"], labels)

    text = "".join(chr(c) for c in rng.integers(32, 0x3000, size=200))
    write_text_atomically(tmp_path / "notes.txt", text)
    assert (tmp_path / "notes.txt").read_text() == text
    assert _folder_names(tmp_path) == {"shard-00000.npz", "notes.txt"}


def test_the_temporary_is_a_hidden_sibling(tmp_path):
    tmp = temporary_sibling(tmp_path / "a.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(".a.json.tmp")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)")])
def test_a_full_disk_is_one_line_naming_the_folder_and_the_old_file_stays(tmp_path, failure):
    from dit_gspn.atomic_write import DiskFullError
    from dit_gspn.errors import UserError

    path = tmp_path / "index.json"
    path.write_text("old content")
    with pytest.raises(DiskFullError, match=rf"no space left on {tmp_path} while writing index.json") as info:
        with atomic_write(path) as tmp:
            tmp.write_text("half of the new con")
            raise failure
    assert isinstance(info.value, UserError) and isinstance(info.value, OSError)  # one line; still an OSError
    assert info.value.__cause__ is failure
    assert path.read_text() == "old content"
    assert _folder_names(tmp_path) == {"index.json"}
