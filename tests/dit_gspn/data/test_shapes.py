"""dit_gspn.data.shapes, the built-in dataset: seeded, balanced, recognisable by colour, and doubled by flips."""
import numpy as np
import torch

from dit_gspn.data import SHAPE_CLASSES, ShapesDataset, make_shapes


def test_shapes_are_seeded_balanced_and_recognisable_by_colour():
    a_img, a_lab = make_shapes(4, seed=7)
    b_img, b_lab = make_shapes(4, seed=7)
    c_img, _ = make_shapes(4, seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    assert not np.array_equal(a_img, c_img)
    assert np.bincount(a_lab).tolist() == [4] * len(SHAPE_CLASSES)
    # The shape's colour (the pixels farthest from the background median) names the class, except
    # for the pairs of classes that share hue families, which the shape tells apart instead.
    from dit_gspn.data.shapes import _COLOURS
    for img, lab in zip(a_img.astype(float), a_lab):
        flat = img.reshape(-1, 3)
        dist = np.linalg.norm(flat - np.median(flat, axis=0), axis=1)
        colour = flat[dist > 0.5 * dist.max()].mean(axis=0)
        assert np.argmin(np.linalg.norm(_COLOURS - colour, axis=1)) == lab


def test_shapes_dataset_flip_doubles_with_mirrored_copies():
    ds = ShapesDataset(num_per_class=2, seed=1, flip=True)
    assert len(ds) == 40 and ds.num_classes == 10
    img, label = ds[3]
    img_f, label_f = ds[23]
    assert label == label_f == 3 and img.shape == (3, 32, 32) and -1 <= img.min() < img.max() <= 1
    torch.testing.assert_close(img_f, img.flip(-1))
