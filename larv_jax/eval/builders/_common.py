"""Helpers shared by the local builders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Any PIL image / uint8 array -> PNG bytes (lossless; TFDS stores encoded bytes as given)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing ({what}); see larv_jax/eval/builders/__init__.py")
    return path


def read_list(path: Path) -> list[str]:
    """A split list: one file name (or relative path) per line; blank lines ignored."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
