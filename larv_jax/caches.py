"""Where larv_jax keeps its on-disk caches (the CLI uses them; the library only when asked).

One root, ``$LARV_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/larv_jax`` (``~/.cache/larv_jax``);
``LARV_JAX_CACHE_DIR=off`` (or ``0``, ``none``, ``false``, empty) turns every cache off:

- ``<root>/jax``: JAX's persistent compilation cache (the diagnostics, SVC and scoring kernels
  compile once per machine); a ``JAX_COMPILATION_CACHE_DIR`` set by the user wins;
- ``<root>/larv-base``: the LARV per-base cache (r_eff(theta0), ||theta0||, the base Grams;
  ~58 MB for ViT-B/32, ~0.2 GB for ViT-L/14), one file per pretrained model, keyed by content
  (:func:`larv_jax.diagnostics.store.base_fingerprint`). Files can be deleted at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LARV_JAX_CACHE_DIR"
_OFF = ("", "off", "0", "none", "false")


def cache_root() -> Path | None:
    """The caches' root directory, or None when ``LARV_JAX_CACHE_DIR`` turns them off."""
    d = os.environ.get(CACHE_ENV)
    if d is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(xdg) / "larv_jax"
    return None if d.strip().lower() in _OFF else Path(d)


def compile_cache_dir() -> str | None:
    """JAX's persistent compilation cache directory (None: off, or the user set
    ``JAX_COMPILATION_CACHE_DIR``, which JAX then reads itself)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    root = cache_root()
    return None if root is None else str(root / "jax")


def base_cache_dir() -> Path | None:
    """The LARV per-base cache directory (None: off)."""
    root = cache_root()
    return None if root is None else root / "larv-base"
