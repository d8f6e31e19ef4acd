"""Bridge from merger names to the veneer's merger callables (``merge(tau_flat) -> delta_flat``).

The merge methods themselves live in :mod:`larv_jax.merging` (its registry ``METHODS``); this module
only adapts them to the veneer's calling convention, so every registry entry, presets included,
works under LARV. ``larv_jax.merging`` is imported lazily: the veneer and its tests do not need it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np


def _registry() -> Mapping[str, Any]:
    try:
        from larv_jax import merging
    except ImportError as e:  # the merging engine is a separate piece
        raise ImportError(f"merger names need larv_jax.merging ({e}); pass a callable instead"
                          ) from None
    return merging.METHODS


def names() -> list[str]:
    """Registry names available to the veneer and the grid."""
    return sorted(_registry())


def merger(name: str, *, model: str | None = None, **options: Any):
    """``merge(tau_flat) -> delta_flat`` for registry method ``name`` with its options.

    ``tau_flat``: ``{path: [K, ..]}`` task vectors (Flax layout, stacked blocks; lazy mappings
    stream); the delta includes the method's own coefficient (SPEC §4). ``model`` (a
    ``CLIPConfig.name`` such as ``ViT-B-32``) picks per-backbone defaults (Iso-C's scale).
    Unknown names or options raise ValueError listing the valid ones.
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown merge method {name!r}; valid: {sorted(registry)}")
    fn = registry[name]
    _check_options(name, fn, options)
    from larv_jax.merging import resolve_hparams

    hparams = resolve_hparams(name, options, model=model)

    def merge(tau: Mapping[str, Any]) -> dict[str, Any]:
        delta = fn(tau, **hparams)
        return {p: np.asarray(v, np.float32) for p, v in _flat(delta).items()}

    merge.__name__ = f"merge_{name}"
    merge.method_name = name
    merge.hparams = hparams
    return merge


def svc(method: str | None = None, **options: Any):
    """``svc(delta_flat, tau_flat) -> delta_flat``: singular value calibration (SPEC §5), with
    ``alpha`` defaulting to the base merger's value (:data:`larv_jax.merging.SVC_ALPHA`)."""
    try:
        from larv_jax.merging import svc as svc_fn
        from larv_jax.merging import svc_alpha
    except ImportError as e:
        raise ImportError(f"SVC needs larv_jax.merging.svc ({e})") from None
    _check_options("svc", svc_fn, options)
    if "alpha" not in options:
        options["alpha"] = svc_alpha(method) if method else 0.1

    def calibrate(delta: Mapping[str, Any], tau: Mapping[str, Any]) -> dict[str, Any]:
        out = svc_fn(delta, tau, **options)
        return {p: np.asarray(v, np.float32) for p, v in _flat(out).items()}

    return calibrate


def _check_options(name: str, fn: Any, options: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    bad = sorted(set(options) - set(params))
    if bad:
        valid = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"unknown option(s) {bad} for merge method {name!r}; valid: {valid}")


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    from larv_jax.larv.plan import as_flat

    return as_flat(tree)
