"""Procedural 32x32 RGB images for the offline zoo: drawing primitives, the task generators and the
captioned pretraining mixture.

Everything is numpy + Pillow and is driven by an explicit ``np.random.Generator``: the same
generator state gives the same uint8 bytes. Shapes are drawn at 4x resolution and box-filtered
down, so edges are anti-aliased the same way on every platform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPER = 4  # supersampling factor for anti-aliased shapes

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 170, 55), "blue": (40, 70, 225), "yellow": (235, 215, 40),
    "orange": (245, 135, 25), "purple": (135, 45, 185), "cyan": (40, 205, 215),
    "pink": (245, 120, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
SIZES = ("tiny", "small", "large", "huge")
SIZE_RADIUS = {"tiny": (2.6, 3.4), "small": (4.6, 5.6), "large": (7.6, 8.8), "huge": (11.5, 13.0)}
TEXTURES = ("stripes", "checkerboard", "dots", "noise", "waves", "grid")
ORIENTATIONS = ("horizontal", "vertical", "rising diagonal", "falling diagonal")
ORIENTATION_ANGLE = {"horizontal": 0.0, "vertical": 90.0, "rising diagonal": 45.0,
                     "falling diagonal": 135.0}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS = NUMBERS[1:7]


# -- primitives -------------------------------------------------------------------------------

def jitter_colour(rng: np.random.Generator, name: str, amount: int = 22) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[name], np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-amount, amount + 1, 3), 0, 255))


def dull_colour(rng: np.random.Generator, lo: int = 20, hi: int = 110) -> tuple[int, int, int]:
    """A dark, low-saturation background colour (never one of the named colours)."""
    g = int(rng.integers(lo, hi))
    return tuple(int(np.clip(g + rng.integers(-12, 13), 0, 255)) for _ in range(3))


def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy), circumradius r, rotated by ``rot`` radians."""
    def ring(n, radii, offset):
        pts = []
        for i in range(n * len(radii)):
            a = offset + rot + 2 * math.pi * i / (n * len(radii))
            rr = radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "star":
        return ring(5, [r, 0.42 * r], -math.pi / 2)
    if shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def draw_shapes(background: np.ndarray, items: list[tuple[str, float, float, float, float,
                                                          tuple[int, int, int]]]) -> np.ndarray:
    """Draw ``(shape, cx, cy, r, rot, rgb)`` items (32-px coordinates) onto a uint8 background."""
    img = Image.fromarray(background).resize((SIZE * SUPER, SIZE * SUPER), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for shape, cx, cy, r, rot, rgb in items:
        cx, cy, r = cx * SUPER, cy * SUPER, r * SUPER
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            d.polygon(shape_polygon(shape, cx, cy, r, rot), fill=rgb)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def plain(rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(np.asarray(dull_colour(rng), np.uint8), (SIZE, SIZE, 3)).copy()


def noisy_background(rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    bg = plain(rng).astype(np.float32) + rng.normal(0, sigma, (SIZE, SIZE, 1)).astype(np.float32)
    return np.clip(bg, 0, 255).astype(np.uint8)


# -- task domains: one background look per task, so tasks differ in input domain as real suites
# do (digits, satellite images, textures, ...); see ``ZooSpec.domains`` and the README's account
# of what was tried (darker, pretraining-like domains transferred better but interfered more).

def _finish(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def paper(rng: np.random.Generator) -> np.ndarray:
    """Light cream paper with faint grain."""
    base = np.asarray([230, 224, 204], np.float32) + rng.integers(-14, 15, 3)
    return _finish(base + rng.normal(0, 4.0, (SIZE, SIZE, 1)).astype(np.float32))


def night(rng: np.random.Generator) -> np.ndarray:
    """Dark navy sky with a few faint stars."""
    base = np.asarray([16, 20, 46], np.float32) + rng.integers(-8, 9, 3)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    for _ in range(int(rng.integers(4, 12))):
        y, x = rng.integers(0, SIZE, 2)
        img[y, x] = float(rng.integers(90, 170))
    return _finish(img + rng.normal(0, 2.0, img.shape))


def grass(rng: np.random.Generator) -> np.ndarray:
    """Green blotchy grass."""
    base = np.asarray([62, 128, 52], np.float32) + rng.integers(-15, 16, 3)
    coarse = rng.normal(0, 16.0, (SIZE // 4, SIZE // 4, 1)).astype(np.float32)
    return _finish(base + np.kron(coarse, np.ones((4, 4, 1), np.float32))
                   + rng.normal(0, 6.0, (SIZE, SIZE, 1)).astype(np.float32))


def sky(rng: np.random.Generator) -> np.ndarray:
    """Vertical gradient from a deep to a pale blue."""
    top = np.asarray([80, 140, 215], np.float32) + rng.integers(-15, 16, 3)
    bottom = np.asarray([200, 225, 245], np.float32) + rng.integers(-10, 11, 3)
    t = (np.arange(SIZE, dtype=np.float32)[:, None, None] + 0.5) / SIZE
    img = (1 - t) * top + t * bottom + np.zeros((SIZE, SIZE, 3), np.float32)
    return _finish(img + rng.normal(0, 3.0, img.shape))


def sand(rng: np.random.Generator) -> np.ndarray:
    """Beige sand with faint diagonal ripples."""
    base = np.asarray([205, 178, 132], np.float32) + rng.integers(-12, 13, 3)
    x, y = _grid()
    ripple = 10.0 * np.sin((x + y) * float(rng.uniform(0.5, 0.9)) + rng.uniform(0, 6.3))
    return _finish(base + ripple[..., None]
                   + rng.normal(0, 7.0, (SIZE, SIZE, 1)).astype(np.float32))


def fabric(rng: np.random.Generator) -> np.ndarray:
    """Dark grey cloth with a fine cross-hatch."""
    g = float(rng.integers(50, 80))
    x, y = _grid()
    hatch = 14.0 * (((x.astype(int) + y.astype(int)) % 3 == 0)
                    | ((x.astype(int) - y.astype(int)) % 3 == 0))
    return _finish(g + hatch[..., None] + rng.normal(0, 4.0, (SIZE, SIZE, 3)).astype(np.float32))


DOMAINS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "paper": paper, "night": night, "grass": grass, "sky": sky, "sand": sand, "fabric": fabric,
}
DOMAIN_PHRASES = {"paper": "on paper", "night": "at night", "grass": "on the grass",
                  "sky": "in the sky", "sand": "on the sand", "fabric": "on fabric"}


def _grid(n: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return x + 0.5, y + 0.5


def two_tone(mask: np.ndarray, c0: tuple[int, int, int], c1: tuple[int, int, int]) -> np.ndarray:
    """Blend two colours with a [0, 1] float mask ``[H, W]``."""
    m = np.clip(mask, 0, 1)[..., None]
    out = (1 - m) * np.asarray(c0, np.float32) + m * np.asarray(c1, np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def grating(rng: np.random.Generator, angle_deg: float, *, period: float | None = None,
            duty: float = 0.5) -> np.ndarray:
    """Soft square-wave grating mask ``[32, 32]``: bars run along ``angle_deg`` (0 = horizontal bars,
    angles measured anticlockwise in image coordinates with y pointing up)."""
    x, y = _grid()
    period = float(rng.uniform(5.0, 9.0)) if period is None else period
    a = math.radians(angle_deg)
    # coordinate across the bars: the normal of the bar direction (cos a, -sin a) in pixel space
    u = -x * math.sin(a) - y * math.cos(a)
    phase = (u / period + rng.uniform(0, 1)) % 1.0
    return np.clip((duty - phase) * 6.0 + 0.5, 0, 1) * np.clip((phase) * 6.0 + 0.5, 0, 1)


def texture(rng: np.random.Generator, name: str) -> np.ndarray:
    """A full-frame two-tone texture ``[32, 32, 3]``."""
    x, y = _grid()
    c0 = dull_colour(rng, 10, 90)
    c1 = jitter_colour(rng, str(rng.choice(list(COLOURS))), 40)
    if name == "stripes":
        mask = grating(rng, float(rng.uniform(0, 180)), period=float(rng.uniform(4.0, 8.0)))
    elif name == "checkerboard":
        p = float(rng.uniform(3.0, 6.0))
        a = float(rng.uniform(0, math.pi / 2))
        xr, yr = x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)
        mask = ((np.floor(xr / p) + np.floor(yr / p)) % 2).astype(np.float32)
    elif name == "dots":
        p = float(rng.uniform(5.0, 8.0))
        ox, oy = rng.uniform(0, p, 2)
        dx = ((x + ox) % p) - p / 2
        dy = ((y + oy) % p) - p / 2
        r = p * float(rng.uniform(0.22, 0.32))
        mask = np.clip(r - np.sqrt(dx ** 2 + dy ** 2) + 0.5, 0, 1)
    elif name == "noise":
        coarse = rng.uniform(0, 1, (SIZE // 2, SIZE // 2)).astype(np.float32)
        mask = (np.kron(coarse, np.ones((2, 2), np.float32)) > 0.5).astype(np.float32)
    elif name == "waves":
        p = float(rng.uniform(6.0, 10.0))
        amp = float(rng.uniform(2.0, 4.0))
        f = float(rng.uniform(8.0, 14.0))
        if rng.uniform() < 0.5:
            x, y = y, x
        u = y + amp * np.sin(2 * np.pi * x / f + rng.uniform(0, 2 * np.pi))
        mask = (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    elif name == "grid":
        p = float(rng.uniform(5.0, 8.0))
        ox, oy = rng.uniform(0, p, 2)
        w = float(rng.uniform(1.0, 1.8))
        mask = np.maximum(((x + ox) % p) < w, ((y + oy) % p) < w).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {name!r}; valid: {list(TEXTURES)}")
    return two_tone(mask, c0, c1)


def position_centre(rng: np.random.Generator, pos: str, jitter: float = 2.0) -> tuple[float, float]:
    i = POSITIONS.index(pos)
    row, col = divmod(i, 3)
    cx = 6.0 + 10.0 * col + rng.uniform(-jitter, jitter)
    cy = 6.0 + 10.0 * row + rng.uniform(-jitter, jitter)
    return float(cx), float(cy)


def scatter(rng: np.random.Generator, n: int, r: float, *, tries: int = 200, restarts: int = 50
            ) -> list[tuple[float, float]]:
    """``n`` non-overlapping centres for circumradius ``r`` inside the frame (rejection sampling,
    restarted from scratch when a draw paints itself into a corner)."""
    for _ in range(restarts):
        pts: list[tuple[float, float]] = []
        for _ in range(tries):
            if len(pts) == n:
                break
            p = tuple(rng.uniform(r + 0.5, SIZE - r - 0.5, 2))
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (2 * r + 1.2) ** 2 for q in pts):
                pts.append((float(p[0]), float(p[1])))
        if len(pts) == n:
            return pts
    raise ValueError(f"could not place {n} objects of radius {r}")


def add_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    out = img.astype(np.float32) + rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# -- digits (scikit-learn's bundled 8x8 digits) -------------------------------------------------

def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: uint8 ``[1797, 8, 8]`` in 0..255 and labels ``[1797]``."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    img = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return img, d.target.astype(np.int64)


def digit_image(rng: np.random.Generator, glyph: np.ndarray, *, styled: bool) -> np.ndarray:
    """An 8x8 glyph upscaled to 32x32. ``styled``: random colours, scale and placement (the
    pretraining look); else white on black, centred (the task's look)."""
    if not styled:
        big = Image.fromarray(glyph).resize((28, 28), Image.BICUBIC)
        canvas = np.zeros((SIZE, SIZE), np.uint8)
        canvas[2:30, 2:30] = np.asarray(big)
        return np.repeat(canvas[..., None], 3, axis=-1)
    side = int(rng.integers(16, 29))
    big = np.asarray(Image.fromarray(glyph).resize((side, side), Image.BICUBIC), np.float32) / 255
    mask = np.zeros((SIZE, SIZE), np.float32)
    top, left = rng.integers(0, SIZE - side + 1, 2)
    mask[top:top + side, left:left + side] = big
    fg = jitter_colour(rng, str(rng.choice(list(COLOURS))), 30)
    return two_tone(mask, dull_colour(rng, 10, 80), fg)


# -- task generators: (rng, n) -> (uint8 [n, 32, 32, 3], int64 labels [n]) -------------------

def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    labels = np.arange(n) % k
    rng.shuffle(labels)
    return labels.astype(np.int64)


def _random_shape_item(rng: np.random.Generator, *, shape: str | None = None,
                       colour: str | None = None, r: float | None = None,
                       centre: tuple[float, float] | None = None):
    shape = shape or str(rng.choice(SHAPES))
    colour = colour or str(rng.choice(list(COLOURS)))
    r = float(rng.uniform(4.5, 9.0)) if r is None else r
    cx, cy = centre or tuple(float(v) for v in rng.uniform(r + 1, SIZE - r - 1, 2))
    return (shape, cx, cy, r, float(rng.uniform(-0.35, 0.35)), jitter_colour(rng, colour))


def gen_shapes(rng: np.random.Generator, n: int, background: Callable | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Which shape: one shape of any colour, size and place on a noisy background, plus a small
    distractor dot half of the time."""
    labels = _balanced_labels(rng, n, len(SHAPES))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        items = [_random_shape_item(rng, shape=SHAPES[y], r=float(rng.uniform(6.0, 11.0)))]
        if rng.uniform() < 0.5:
            items.insert(0, ("circle", *rng.uniform(3, 29, 2), 1.5, 0.0,
                             jitter_colour(rng, str(rng.choice(list(COLOURS))))))
        out[i] = add_noise(rng, draw_shapes((background or noisy_background)(rng), items), 6.0)
    return out, labels


def gen_colours(rng: np.random.Generator, n: int, background: Callable | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Which colour: one or two shapes of the same colour, under random brightness (x0.45-1.15)
    and desaturation (up to 45 % grey), so neighbouring hues (red/orange/pink, blue/purple/cyan)
    get confusable."""
    names = list(COLOURS)
    labels = _balanced_labels(rng, n, len(names))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        items = []
        for _ in range(int(rng.integers(1, 3))):
            it = _random_shape_item(rng, colour=names[y])
            rgb = np.asarray(jitter_colour(rng, names[y], 30), np.float32)
            rgb = rgb * rng.uniform(0.45, 1.15)
            grey = rgb.mean()
            rgb = rgb + rng.uniform(0.0, 0.45) * (grey - rgb)
            items.append((*it[:5], tuple(int(v) for v in np.clip(np.round(rgb), 0, 255))))
        out[i] = add_noise(rng, draw_shapes((background or noisy_background)(rng), items), 10.0)
    return out, labels


def gen_counts(rng: np.random.Generator, n: int, background: Callable | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """How many objects (one..six): small shapes of mixed kind and colour, scattered."""
    labels = _balanced_labels(rng, n, len(COUNTS))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        r = float(rng.uniform(2.6, 3.6))
        items = [_random_shape_item(rng, r=r, centre=c) for c in scatter(rng, int(y) + 1, r)]
        out[i] = add_noise(rng, draw_shapes((background or noisy_background)(rng), items), 5.0)
    return out, labels


def gen_positions(rng: np.random.Generator, n: int, background: Callable | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Where the object is: a 3x3 grid of places, any shape and colour, on a texture or plain."""
    labels = _balanced_labels(rng, n, len(POSITIONS))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        r = float(rng.uniform(3.5, 5.0))
        centre = position_centre(rng, POSITIONS[y], jitter=1.5)
        bg = (background or noisy_background)(rng)
        out[i] = add_noise(rng, draw_shapes(bg, [_random_shape_item(rng, r=r, centre=centre)]), 6.0)
    return out, labels


def gen_sizes(rng: np.random.Generator, n: int, background: Callable | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """How big the object is (tiny / small / large / huge), anywhere it fits."""
    labels = _balanced_labels(rng, n, len(SIZES))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        r = float(rng.uniform(*SIZE_RADIUS[SIZES[y]]))
        lo, hi = min(r + 0.5, 16.0), max(SIZE - r - 0.5, 16.0)
        centre = tuple(float(v) for v in rng.uniform(lo, hi, 2))
        out[i] = add_noise(rng, draw_shapes((background or noisy_background)(rng),
                                            [_random_shape_item(rng, r=r, centre=centre)]), 6.0)
    return out, labels


def gen_textures(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which texture fills the frame (stripes at any angle, checkerboard, dots, noise, waves, grid)."""
    labels = _balanced_labels(rng, n, len(TEXTURES))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        out[i] = add_noise(rng, texture(rng, TEXTURES[y]), 10.0)
    return out, labels


def bar_polygon(cx: float, cy: float, length: float, width: float, angle_deg: float
                ) -> list[tuple[float, float]]:
    """A rotated rectangle (32-px coordinates, y down; ``angle_deg`` anticlockwise as seen)."""
    a = math.radians(angle_deg)
    dx, dy = math.cos(a), -math.sin(a)
    nx, ny = -dy, dx
    h, w = length / 2, width / 2
    return [(cx + sx * h * dx + sw * w * nx, cy + sx * h * dy + sw * w * ny)
            for sx, sw in ((-1, -1), (1, -1), (1, 1), (-1, 1))]


def gen_orientations(rng: np.random.Generator, n: int, background: Callable | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Which way the bars run (horizontal, vertical, rising, falling): one to three short
    parallel bars (+-15 degrees) anywhere on a noisy background, not the full-frame gratings of
    pretraining."""
    labels = _balanced_labels(rng, n, len(ORIENTATIONS))
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, y in enumerate(labels):
        angle = ORIENTATION_ANGLE[ORIENTATIONS[y]] + float(rng.uniform(-15, 15))
        bg = (background or noisy_background)(rng)
        img = Image.fromarray(bg).resize((SIZE * SUPER,) * 2, Image.NEAREST)
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            length, width = float(rng.uniform(10, 22)), float(rng.uniform(1.8, 3.5))
            cx, cy = rng.uniform(9, 23, 2)
            rgb = jitter_colour(rng, str(rng.choice(list(COLOURS))), 40)
            poly = bar_polygon(float(cx), float(cy), length, width, angle)
            d.polygon([(x * SUPER, yy * SUPER) for x, yy in poly], fill=rgb)
        out[i] = add_noise(rng, np.asarray(img.resize((SIZE, SIZE), Image.BOX)), 12.0)
    return out, labels


def make_digit_task(glyphs: np.ndarray, glyph_labels: np.ndarray) -> Callable:
    """Generator over a fixed set of scikit-learn glyphs (white on black, centred, light noise)."""

    def gen_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.choice(len(glyphs), size=n, replace=n > len(glyphs))
        out = np.empty((n, SIZE, SIZE, 3), np.uint8)
        for i, j in enumerate(idx):
            out[i] = add_noise(rng, digit_image(rng, glyphs[j], styled=False), 4.0)
        return out, glyph_labels[idx].astype(np.int64)

    return gen_digits


# -- the pretraining mixture ------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def caption_object(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One shape with colour, size and place; the caption names a random subset of them."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    size = _pick(rng, SIZES)
    r = float(rng.uniform(*SIZE_RADIUS[size]))
    if size in ("tiny", "small") and rng.uniform() < 0.6:
        pos = _pick(rng, POSITIONS)
        centre = position_centre(rng, pos, jitter=1.5)
    else:
        pos = "center"
        centre = (16.0 + float(rng.uniform(-1.5, 1.5)), 16.0 + float(rng.uniform(-1.5, 1.5)))
    img = draw_shapes(plain(rng) if rng.uniform() < 0.5 else noisy_background(rng),
                      [_random_shape_item(rng, shape=shape, colour=colour, r=r, centre=centre)])
    parts = [rng.uniform() < p for p in (0.6, 0.5, 0.35, 0.35)]  # colour, shape, size, place
    if not any(parts):
        parts[int(rng.integers(4))] = True
    noun = shape if parts[1] else "shape"
    words = ([size] if parts[2] else []) + ([colour] if parts[0] else []) + [noun]
    caption = _pick(rng, ("a {}", "a photo of a {}", "a drawing of a {}", "{}")).format(" ".join(words))
    if parts[3]:
        caption += _pick(rng, (" in the {}", " at the {}")).format(pos)
    return img, caption


def caption_count(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    k = int(rng.integers(1, 7))
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    r = float(rng.uniform(2.8, 3.8))
    items = [_random_shape_item(rng, shape=shape, colour=colour, r=r, centre=c)
             for c in scatter(rng, k, r)]
    img = draw_shapes(plain(rng), items)
    word = NUMBERS[k]
    caption = _pick(rng, (f"{word} {colour} shapes", f"{word} objects", f"a photo of {word} things",
                          f"{word} {shape} shapes"))
    return img, caption


def caption_texture(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    name = _pick(rng, TEXTURES)
    img = texture(rng, name)
    return img, _pick(rng, (f"a {name} pattern", f"a {name} texture", f"{name}"))


def caption_orientation(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    name = _pick(rng, ORIENTATIONS)
    angle = ORIENTATION_ANGLE[name] + float(rng.uniform(-8, 8))
    mask = grating(rng, angle, period=float(rng.uniform(6.0, 10.0)))
    img = two_tone(mask, dull_colour(rng, 10, 90), jitter_colour(rng, _pick(rng, list(COLOURS))))
    return img, _pick(rng, (f"{name} stripes", f"a {name} line pattern", f"{name} lines"))


def make_caption_digit(glyphs: np.ndarray, glyph_labels: np.ndarray) -> Callable:
    def caption_digit(rng: np.random.Generator) -> tuple[np.ndarray, str]:
        j = int(rng.integers(len(glyphs)))
        img = digit_image(rng, glyphs[j], styled=True)
        word = NUMBERS[int(glyph_labels[j])]
        return img, _pick(rng, (f"the digit {word}", f"a handwritten {word}", f"the number {word}"))

    return caption_digit


def caption_scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One shape on one of the task domains' backgrounds; the caption names the domain and, some
    of the time, the shape or its colour (so pretraining has seen every domain, but rarely with
    the words a task asks about)."""
    domain = _pick(rng, list(DOMAINS))
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    r = float(rng.uniform(3.0, 10.0))
    img = draw_shapes(DOMAINS[domain](rng), [_random_shape_item(rng, shape=shape, colour=colour,
                                                                r=r)])
    phrase = DOMAIN_PHRASES[domain]
    u = rng.uniform()
    if u < 0.25:
        caption = f"a {shape} {phrase}"
    elif u < 0.5:
        caption = f"something {colour} {phrase}"
    else:
        caption = _pick(rng, (phrase, f"a photo {phrase}", f"a picture {phrase}"))
    return img, caption


def pretraining_mixture(glyphs: np.ndarray, glyph_labels: np.ndarray, *, domains: bool = False
                        ) -> tuple[tuple[Callable, float], ...]:
    """``(caption_fn, weight)`` pairs of the captioned pretraining mixture (``domains``: plus
    captioned scenes on the task domains' backgrounds)."""
    mix = ((caption_object, 0.40), (caption_count, 0.15), (caption_texture, 0.15),
           (caption_orientation, 0.10), (make_caption_digit(glyphs, glyph_labels), 0.20))
    return (*mix, (caption_scene, 0.20)) if domains else mix


def caption_pool(rng: np.random.Generator, n: int, mixture) -> tuple[np.ndarray, list[str]]:
    """``n`` captioned images drawn from ``mixture``: (uint8 ``[n, 32, 32, 3]``, captions)."""
    fns = [f for f, _ in mixture]
    w = np.asarray([p for _, p in mixture], np.float64)
    which = rng.choice(len(fns), size=n, p=w / w.sum())
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i, k in enumerate(which):
        images[i], cap = fns[k](rng)
        captions.append(cap)
    return images, captions
