"""A PNG grid of samples with each image's class name written under it, and the classes it shows by default."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dit_gspn.atomic_write import atomic_write
from dit_gspn.image_npz import to_uint8

#: Tiles narrower than this are enlarged (nearest neighbour, integer factor) so a label fits under them.
MIN_TILE_WIDTH = 96
_FONT_SIZE = 11
_LABEL_HEIGHT = 16
_PAD = 2
#: DiT's sample.py classes (ImageNet ids): the default grid of a 1000-class model.
IMAGENET_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def default_grid_classes(num_classes: int) -> list[int]:
    """The classes a grid shows when none are named: DiT's ImageNet ones for 1000 classes, else up to 10
    spread evenly over the model's classes."""
    if num_classes == 1000:
        return list(IMAGENET_GRID_CLASSES)
    return np.linspace(0, num_classes - 1, min(num_classes, 10)).round().astype(int).tolist()


def _caption(label, class_names: Sequence[str] | None) -> str:
    label = int(label)
    if class_names is None:
        return str(label)
    if not 0 <= label < len(class_names):
        raise ValueError(f"class id {label} has no name: class_names has {len(class_names)} entries")
    return str(class_names[label])


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_labelled_grid(images: torch.Tensor, labels, path: str | os.PathLike,
                       class_names: Sequence[str] | None = None, nrow: int | None = None) -> Path:
    """Write ``images`` (N, 3, H, W) in [-1, 1] as one PNG grid, each with its class name (or id) under it.

    ``nrow`` images per row (default: a square-ish grid). Tiles smaller than ``MIN_TILE_WIDTH`` pixels are
    enlarged by an integer factor, so 32x32 samples stay readable. The file is written atomically.
    Returns the path written.
    """
    pixels = to_uint8(images)
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    if len(labels) != len(pixels):
        raise ValueError(f"got {len(pixels)} images but {len(labels)} labels")
    n, height, width, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    factor = max(1, math.ceil(MIN_TILE_WIDTH / width))
    tile_w, tile_h = width * factor, height * factor
    cell_w, cell_h = tile_w + 2 * _PAD, tile_h + _LABEL_HEIGHT + 2 * _PAD

    canvas = Image.new("RGB", (nrow * cell_w, ncol_rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=_FONT_SIZE)
    for i, (tile, label) in enumerate(zip(pixels, labels)):
        left, top = (i % nrow) * cell_w + _PAD, (i // nrow) * cell_h + _PAD
        canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (left, top))
        text = _fit(draw, _caption(label, class_names), font, tile_w)
        text_x = left + (tile_w - draw.textlength(text, font=font)) / 2
        draw.text((text_x, top + tile_h + 1), text, fill="black", font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
