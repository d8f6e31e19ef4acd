"""CLIP image preprocessing (SPEC §8), in numpy + Pillow.

Shortest side to ``size`` with PIL bicubic (the other side ``int(size * long / short)``, as
``CLIPImageProcessor`` and torchvision ``Resize`` compute it), centre crop ``size`` x ``size``
(top/left offset ``(h - size) // 2``, the ``CLIPImageProcessor`` rounding), scale to [0, 1],
normalise with the OpenAI mean/std. Grayscale (``[H, W]`` or ``[H, W, 1]``) is repeated to RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` uint8 -> ``[H, W, 3]`` uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image; got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W, C] image with C in (1, 3, 4); got {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def resize_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> uint8 ``[size, size, 3]``: shortest side to ``size`` (bicubic), centre crop."""
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32, ``(x / 255 - mean) / std``."""
    return (image.astype(np.float32) / np.float32(255.0) - CLIP_MEAN) / CLIP_STD


def clip_preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> float32 ``[size, size, 3]`` CLIP input."""
    return normalize(resize_crop(image, size))
