"""ADM's center crop: how DiT turns an arbitrary photo into a square training image."""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side is ``image_size`` and center-crop to a square (H, W, C) uint8 array.

    As ADM does it: halve with a box filter while the short side is at least twice the target, then
    one bicubic resize, then crop (https://github.com/openai/guided-diffusion, image_datasets.py).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]
