"""The seven corruptions of the robustness protocol (SPEC §8), in numpy + Pillow + scipy.

Ported from the ideas of hendrycks/robustness (``make_imagenet_c.py``, ``make_cifar_c.py``) and
bethgelab/imagecorruptions (both Apache-2.0; Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019), rewritten for any image size and
explicit ``np.random.Generator`` seeding, without Wand/ImageMagick or OpenCV:

* ``motion_blur``: our own kernel. ImageMagick's MotionBlurImage (what the references call)
  averages ``2 * radius + 1`` copies of the image shifted by ``i`` pixels (i = 0..2r) along a
  random angle in [-45, 45] degrees with one-sided Gaussian weights ``exp(-i^2 / (2 sigma^2))``;
  we do the same with edge replication at the borders.
* ``spatter`` (water mode): OpenCV's Canny edges of the thresholded liquid layer are replaced by
  the boundary of its support (the layer is zero outside the blobs, so that is where Canny fires)
  and ``cv2.distanceTransform`` by scipy's exact Euclidean transform. The mud mode is exact.
* ``pixelate``: FusionBench's CIFAR code shrinks to ``32 * c`` pixels whatever the input size; we
  shrink to ``c`` times the input size (BOX) and grow back (BOX), i.e. the CIFAR recipe at 32 px.

Tables: ``"cifar"`` = CIFAR-10-C as used by FusionBench (``make_corruption.py``), the default of
SPEC §8; ``"imagenet"`` = ImageNet-C. Every function maps uint8 ``[H, W, 3]`` (and a Generator)
to uint8 ``[H, W, 3]``; float results are truncated to uint8 as the references do.
FusionBench-comparable numbers come from its precomputed ``tanganke/<task>`` corruption splits
(random draws differ); these functions reproduce the recipe, not those files.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

TABLES: dict[str, dict[str, tuple]] = {
    "cifar": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "jpeg_compression": (80, 65, 58, 50, 40),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                    (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                    (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "spatter": ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                    (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                    (0.67, 0.4, 1, 0.65, 1.5, 1)),
    },
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)


def _check(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"corruptions take uint8 [H, W, 3] images; got {x.dtype} {x.shape}")
    return x


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, c: float) -> np.ndarray:
    """x/255 + N(0, c^2) per element, clipped."""
    x = x / 255.0
    return _to_uint8(np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255)


def impulse_noise(x: np.ndarray, rng: np.random.Generator, c: float) -> np.ndarray:
    """Salt and pepper: each element becomes 0 or 1 (equal odds) with probability ``c``."""
    x = x / 255.0
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x = np.where(hit, salt.astype(np.float64), x)
    return _to_uint8(x * 255)


def contrast(x: np.ndarray, rng: np.random.Generator, c: float) -> np.ndarray:
    """Shrink towards the per-channel mean by ``c``."""
    x = x / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(np.clip((x - means) * c + means, 0, 1) * 255)


def jpeg_compression(x: np.ndarray, rng: np.random.Generator, c: int) -> np.ndarray:
    """Round trip through Pillow JPEG at quality ``c``."""
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=int(c))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def pixelate(x: np.ndarray, rng: np.random.Generator, c: float) -> np.ndarray:
    """BOX-downsample by ``c`` (relative to the input size) and BOX-upsample back."""
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


def motion_kernel(radius: int, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps of a one-sided motion blur: weights ``[2r+1]`` (sum 1), integer offsets ``[2r+1, 2]``
    (dy, dx) = round(i * (sin, cos)(angle)) for i = 0..2r."""
    width = 2 * int(radius) + 1
    i = np.arange(width, dtype=np.float64)
    w = np.exp(-(i ** 2) / (2.0 * sigma ** 2))
    w /= w.sum()
    a = np.deg2rad(angle)
    offsets = np.stack([np.round(i * np.sin(a)), np.round(i * np.cos(a))], axis=1).astype(int)
    return w, offsets


def motion_blur(x: np.ndarray, rng: np.random.Generator, c: tuple[float, float]) -> np.ndarray:
    """Gaussian-weighted streak of ``2r+1`` shifted copies along a random angle in [-45, 45]."""
    radius, sigma = c
    angle = rng.uniform(-45, 45)
    w, offsets = motion_kernel(int(radius), float(sigma), angle)
    h, wd = x.shape[:2]
    pad = int(np.abs(offsets).max())
    xp = np.pad(x.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros(x.shape, np.float64)
    for weight, (dy, dx) in zip(w, offsets, strict=True):
        out += weight * xp[pad + dy:pad + dy + h, pad + dx:pad + dx + wd]
    return _to_uint8(out)


def _equalize_hist(a: np.ndarray) -> np.ndarray:
    """uint8 histogram equalisation (OpenCV's ``equalizeHist`` formula)."""
    hist = np.bincount(a.ravel(), minlength=256)
    cdf = hist.cumsum()
    nz = cdf[hist > 0]
    lo = nz[0] if nz.size else 0
    total = a.size
    if total == lo:
        return a.copy()
    lut = np.clip(np.round((cdf - lo) * 255.0 / (total - lo)), 0, 255).astype(np.uint8)
    return lut[a]


def spatter(x: np.ndarray, rng: np.random.Generator, c: tuple) -> np.ndarray:
    """Water (pale turquoise sheen along blob edges) or mud (brown blobs) splashes."""
    loc, scale, sigma, threshold, intensity, mode = c
    x = x.astype(np.float32) / 255.0
    liquid = rng.normal(loc=loc, scale=scale, size=x.shape[:2])
    liquid = ndimage.gaussian_filter(liquid, sigma=sigma, mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0
    if mode == 0:
        layer = (liquid * 255).astype(np.uint8)
        support = layer > 0
        edges = support ^ ndimage.binary_erosion(support)
        dist = ndimage.distance_transform_edt(~edges) if edges.any() else np.full(
            layer.shape, 20.0)
        dist = np.minimum(dist, 20.0)
        dist = ndimage.uniform_filter(dist, size=3, mode="reflect").astype(np.uint8)
        dist = _equalize_hist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float64)
        dist = np.clip(ndimage.correlate(dist.astype(np.float64), ker, mode="reflect"), 0, 255)
        dist = ndimage.uniform_filter(dist.astype(np.uint8).astype(np.float32), size=3,
                                      mode="reflect")
        m = layer.astype(np.float32) * dist
        peak = m.max()
        m = (m / peak if peak > 0 else m) * intensity
        color = np.array([175, 238, 238], np.float32) / 255.0
        out = np.clip(x + m[..., None] * color, 0, 1)
    else:
        m = (liquid > threshold).astype(np.float32)
        m = ndimage.gaussian_filter(m, sigma=intensity, mode="nearest", truncate=4.0)
        m[m < 0.8] = 0
        color = np.array([63, 42, 20], np.float32) / 255.0
        out = np.clip(x * (1 - m[..., None]) + color * m[..., None], 0, 1)
    return _to_uint8(out * 255)


CORRUPTIONS: dict[str, Callable] = {
    "motion_blur": motion_blur,
    "impulse_noise": impulse_noise,
    "gaussian_noise": gaussian_noise,
    "pixelate": pixelate,
    "spatter": spatter,
    "contrast": contrast,
    "jpeg_compression": jpeg_compression,
}
ALIASES = {"jpeg": "jpeg_compression"}


def _apply(fn: Callable, c, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return fn(_check(x), rng, c)


def get_corruption(name: str, *, severity: int = 3, table: str = "cifar"
                   ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """``(uint8 [H, W, 3], Generator) -> uint8 [H, W, 3]`` for a corruption at ``severity`` 1-5."""
    name = ALIASES.get(name, name)
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {sorted(CORRUPTIONS)}")
    if table not in TABLES:
        raise ValueError(f"unknown corruption table {table!r}; valid: {sorted(TABLES)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5; got {severity}")
    fn = functools.partial(_apply, CORRUPTIONS[name], TABLES[table][name][severity - 1])
    fn.__name__ = name  # type: ignore[attr-defined]
    return fn


def corrupt(image: np.ndarray, name: str, *, severity: int = 3, table: str = "cifar",
            seed: int | np.random.Generator = 0) -> np.ndarray:
    """One-shot convenience: corrupt ``image`` with a seeded generator."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return get_corruption(name, severity=severity, table=table)(image, rng)
