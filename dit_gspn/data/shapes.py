"""The built-in dataset: coloured geometric shapes on dark backgrounds, 10 classes, generated from a seed.

It exists so that the whole pipeline (training, sampling, a labelled grid) runs with no download and
no VAE, in pixel space, on a laptop CPU: each class is one shape in one colour, at a random position
and size, with colour and background jitter, so a model must learn shape, colour and placement.
The same seed gives the same images on every machine. Every class is symmetric under a horizontal
flip, so flipping keeps labels valid.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

#: The class names, in label order, as the grid captions show them.
SHAPE_CLASSES = (
    "red circle", "green square", "blue triangle", "yellow plus", "magenta ring",
    "cyan diamond", "orange stripes", "white X", "purple frame", "lime half-disc",
)

_COLOURS = np.array([
    (230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (230, 50, 220),
    (40, 220, 230), (250, 140, 30), (240, 240, 240), (150, 60, 210), (160, 250, 60),
], dtype=np.float64)


def _shape_mask(label: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of class ``label``'s shape, radius ``r``, at offsets (dy, dx) from its centre."""
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    dist = np.sqrt(dx ** 2 + dy ** 2)
    if label == 0:
        return dist <= r
    if label == 1:
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if label == 2:
        return (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if label == 3:
        return ((np.abs(dx) <= 0.3 * r) | (np.abs(dy) <= 0.3 * r)) & box
    if label == 4:
        return (dist <= r) & (dist >= 0.55 * r)
    if label == 5:
        return np.abs(dx) + np.abs(dy) <= r
    if label == 6:
        return box & (np.floor((dy + r) / (0.4 * r)) % 2 == 0)
    if label == 7:
        return ((np.abs(dx - dy) <= 0.35 * r) | (np.abs(dx + dy) <= 0.35 * r)) & box
    if label == 8:
        return box & ~((np.abs(dx) <= 0.55 * r) & (np.abs(dy) <= 0.55 * r))
    if label == 9:
        return (dist <= r) & (dy <= 0.15 * r)
    raise ValueError(f"shape label must be in [0, {len(SHAPE_CLASSES)}), got {label}")


def make_shapes(num_per_class: int, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) uint8, labels (N,) int64), classes interleaved 0, 1, ..., 9, 0, 1, ...

    A pure function of its arguments.
    """
    rng = np.random.default_rng(seed)
    n = num_per_class * len(SHAPE_CLASSES)
    labels = np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES)
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    s = image_size / 32.0
    for i, label in enumerate(labels):
        r = rng.uniform(8.0, 11.0) * s
        cy, cx = image_size / 2 + rng.uniform(-3.0, 3.0, size=2) * s
        background = rng.uniform(0, 40) + rng.uniform(-8, 8, size=3)
        colour = np.clip(_COLOURS[label] + rng.uniform(-25, 25, size=3), 0, 255)
        mask = _shape_mask(int(label), yy - cy, xx - cx, r)
        img = np.broadcast_to(background, (image_size, image_size, 3)).copy()
        img[mask] = colour
        img += rng.normal(0.0, 3.0, size=img.shape)
        images[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images, labels


class ShapesDataset(Dataset):
    """The built-in class-conditional dataset: ``(image (3, S, S) in [-1, 1], label)`` pairs.

    With ``flip=True`` it holds every image twice, the second copy mirrored left-right (index
    ``i + N`` is image ``i`` flipped): flipping is then part of the data order, so a resumed run
    sees the same batches as an uninterrupted one without any per-item randomness.
    """

    class_names = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)

    def __init__(self, num_per_class: int = 500, image_size: int = 32, seed: int = 0, flip: bool = False):
        images, labels = make_shapes(num_per_class, image_size, seed)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8, (N, 3, S, S)
        self.labels = torch.from_numpy(labels)
        self.flip = bool(flip)

    def __len__(self) -> int:
        return len(self.labels) * (2 if self.flip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.labels)
        image = self.images[index % n].float() / 127.5 - 1.0
        if index >= n:
            image = image.flip(-1)
        return image, int(self.labels[index % n])
