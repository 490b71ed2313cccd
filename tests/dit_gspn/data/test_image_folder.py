"""dit_gspn.data.image_folder: class folders read as ADM-cropped tensors, corrupt files counted, 16-bit PNGs
scaled (as the evaluator reads them) rather than clipped, and an empty class folder named."""
import os

import numpy as np
import pytest
from PIL import Image

from dit_gspn.errors import UserError
from dit_gspn.data import ClassFolderImages

from helpers.images import image_folder


SIZE = 16


def test_16_bit_greyscale_pngs_are_scaled_not_clipped_in_extraction_and_evaluation(tmp_path):
    from dit_gspn.data import ClassFolderImages
    from dit_gspn.metrics import open_input

    rng = np.random.default_rng(2)
    grey16 = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(grey16).save(tmp_path / "imgs" / "a" / "x.png")
    assert Image.open(tmp_path / "imgs" / "a" / "x.png").mode.startswith("I")  # it is stored as 16 bits
    expected = np.round(grey16 / 257.0).astype(np.uint8)  # 65535 -> 255, linearly

    batch = next(open_input(tmp_path / "imgs").batches(4))
    assert batch.shape == (1, 3, 16, 16)
    for channel in range(3):
        np.testing.assert_array_equal(batch[0, channel].numpy(), expected)
    item = ClassFolderImages(tmp_path / "imgs", 16)[0]
    np.testing.assert_allclose(item["image"][0].numpy(), expected / 127.5 - 1.0, atol=1e-6)
    assert (item["image"] >= 1.0).float().mean() < 0.05  # not white


def test_an_empty_class_folder_is_named_when_the_class_list_is_built(tmp_path):
    from dit_gspn.data import ClassFolderImages

    images = image_folder(tmp_path / "images", {"cat": 1, "dog": 1})
    (images / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*bird holds no files"):
        ClassFolderImages(images, 16)


def test_class_folder_labels_and_corrupt_files(image_root):
    ds = ClassFolderImages(image_root, SIZE)
    assert ds.class_names == ["cat", "dog"] and len(ds) == 12
    items = [ds[i] for i in range(len(ds))]
    bad = sorted(os.path.basename(it["path"]) for it in items if it["error"])
    assert bad == ["broken.jpg", "notes.txt"]
    good = [it for it in items if it["image"] is not None]
    assert [it["label"] for it in good] == [0] * 5 + [1] * 5
    assert good[0]["image"].shape == (3, SIZE, SIZE) and -1 <= good[0]["image"].min() < good[0]["image"].max() <= 1
