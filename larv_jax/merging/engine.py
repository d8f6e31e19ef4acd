"""The merge driver: the registry's pure functions run over checkpoints on disk, with a report.

:func:`merge_delta` opens the inputs (:mod:`larv_jax.merging.sources`), streams them through the
lazy task vectors of :mod:`larv_jax.merging.stream` into a method of
:mod:`larv_jax.merging.registry` (then SVC), and writes the provenance report (hyperparameters,
sha256 of the inputs, versions, timings); :func:`apply_delta` is the one ``theta0 + s * D``.
Nothing here holds K models.

The LARV veneer hooks in between the two steps of :func:`merge_checkpoints`
(:mod:`larv_jax.larv.plan`):

    result = merge_delta(base, models, "ties")            # delta D (coefficient included) + report
    scales = plan(...).leaf_scales(shapes)                # per-leaf s (scalar, or [B, 1, ..])
    params = apply_delta(base, result.delta, scales=scales)   # theta0 + s * D
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from larv_jax import tree
from larv_jax.merging import registry
from larv_jax.merging.sources import LeafSource, open_source
from larv_jax.merging.stream import TaskVectors, validate
from larv_jax.merging.svc import svc as svc_fn
from larv_jax.merging.svc import svc_alpha as default_alpha

Flat = dict[str, np.ndarray]


class MergeResult(NamedTuple):
    delta: Flat          # {path: D}, Flax layout, float32; only leaves the models carry
    report: dict         # JSON-serialisable: method, hparams, inputs, versions, timings


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return f"<{len(v)} entries>"
    return repr(v)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("larv_jax", "jax", "jaxlib", "flax", "numpy", "scipy", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _describe(src: LeafSource, hash_inputs: bool) -> dict[str, Any]:
    from larv_jax.io import sha256_file

    files = [Path(f) for f in src.files]
    return {"path": str(src.origin), "source_dtype": str(src.source_dtype),
            "files": [{"file": str(f), "sha256": sha256_file(f) if hash_inputs else None}
                      for f in files]}


def task_vectors(base: Any, models: Sequence[Any]) -> Flat:
    """In-memory float32 task vectors ``{path: tau [K, ...]}`` (``tau_k = theta_k - theta0``) of
    every leaf the models carry, read through :class:`TaskVectors` (the same checks: same keys,
    shapes as the base, finite). ``base`` / ``models``: checkpoint paths, opened checkpoints or
    parameter trees."""
    tv = TaskVectors(base, models)
    return {p: tv[p] for p in tv}


class Prepared(NamedTuple):
    base: LeafSource            # opened (lazily: nothing read yet but the headers)
    models: list[LeafSource]
    merged: list[str]           # paths the fine-tuned models carry (a delta each)
    copied: list[str]           # base paths they lack (copied from the base)
    hparams: dict[str, Any]     # the method's options, defaults filled in and checked
    svc_alpha: float | None     # SVC's alpha when ``svc``, else None


def prepare(base: Any, models: Sequence[Any], method: str, *, svc: bool = False,
            svc_alpha: float | None = None, **hparams: Any) -> Prepared:
    """Every check :func:`merge_delta` makes before it reads a weight: the method and its
    options, the inputs opened (formats, configs), the same keys in every fine-tuned model and
    the base's shapes (:func:`larv_jax.merging.stream.validate`), the SVC options. A dry run
    (``larv merge --dry-run``) stops here; finiteness is checked later, as the leaves are read."""
    registry.get_method(method)
    base = open_source(base)
    models = [open_source(m) for m in models]
    merged, copied = validate(base, models)
    config = base.config
    hp = registry.hparams(method, hparams, model=None if config is None else config.name)
    alpha = None
    if svc:
        alpha = default_alpha(method) if svc_alpha is None else float(svc_alpha)
    elif svc_alpha is not None:
        raise ValueError("svc_alpha is given but svc is False")
    return Prepared(base, models, merged, copied, hp, alpha)


def merge_delta(base: Any, models: Sequence[Any], method: str, *, svc: bool = False,
                svc_alpha: float | None = None, hash_inputs: bool = True,
                **hparams: Any) -> MergeResult:
    """Merge fine-tuned checkpoints into a delta, streaming leaf by leaf.

    ``base`` / ``models``: checkpoint paths (opened with
    :func:`larv_jax.checkpoint.load_checkpoint`), opened checkpoints or parameter trees (any
    :class:`larv_jax.merging.sources.LeafSource`). ``method`` is a
    :data:`larv_jax.merging.registry.METHODS` name; ``hparams`` override its defaults (checked by
    :func:`larv_jax.merging.registry.hparams`). With ``svc`` the
    delta is post-processed by :func:`larv_jax.merging.svc` (``svc_alpha`` defaults to the
    method's value, :data:`larv_jax.merging.SVC_ALPHA`).

    Returns ``MergeResult(delta, report)``: ``delta`` ``{path: D}`` (float32, Flax layout, the
    method's coefficient included) for every leaf the fine-tuned models carry; base leaves they
    lack (e.g. the text tower when the models are ``CLIPVisionModel``) are listed in
    ``report["copied_from_base"]`` and have no delta. Float16 / bfloat16 inputs are read as
    float32 (``report["upcast"]``).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fn = registry.get_method(method)
    base, models, merged_paths, copied, hp, alpha = prepare(base, models, method, svc=svc,
                                                            svc_alpha=svc_alpha, **hparams)
    model_name = None if base.config is None else base.config.name
    timings["open_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = {"base": _describe(base, hash_inputs),
              "models": [_describe(m, hash_inputs) for m in models]}
    timings["hash_s"] = time.perf_counter() - t0

    tv = TaskVectors(base, models, merged_paths, reuse_buffers=True)
    t0 = time.perf_counter()
    delta = _detached(fn(tv, **hp), tv)
    timings["merge_s"] = time.perf_counter() - t0
    tv.close()
    if svc:
        t0 = time.perf_counter()
        delta = _detached(svc_fn(delta, tv, alpha=alpha, exclude=hp.get("exclude", ()),
                                 inplace=True), tv)
        timings["svc_s"] = time.perf_counter() - t0
    timings["read_s"] = tv.read_s

    upcast = [d["path"] for d in [inputs["base"], *inputs["models"]]
              if d["source_dtype"] not in ("float32",)]
    report = {
        "method": method,
        "hparams": {k: _jsonable(v) for k, v in hp.items()},
        "svc": {"alpha": alpha} if svc else None,
        "num_tasks": len(models),
        "inputs": inputs,
        "upcast_to_float32": upcast,
        "merged_leaves": len(merged_paths),
        "merged_params": int(sum(int(np.prod(base.shape(p))) for p in merged_paths)),
        "copied_from_base": copied,
        "config": model_name,
        "versions": _versions(),
        "timings": timings,
    }
    return MergeResult(delta, report)


def _detached(delta: Flat, tv: TaskVectors) -> Flat:
    """``delta`` with any leaf that views one of ``tv``'s reused buffers copied out (no registry
    method returns such a view; this keeps a future one from being overwritten silently)."""
    for path, d in delta.items():
        if any(np.may_share_memory(d, b) for b in tv.buffers):
            delta[path] = np.array(d)
    return delta


def _scale_for(scales: Any, path: str, shape: Sequence[int]) -> Any:
    """The float32 scale of one leaf: a scalar, or for a stacked leaf one value per block shaped
    ``[B, 1, ..., 1]`` (:meth:`larv_jax.larv.plan.Plan.leaf_scales`); None where there is none."""
    if scales is None:
        return None
    s = scales(path) if callable(scales) else scales.get(path, None)
    if s is None:
        return None
    s = np.asarray(s, dtype=np.float32)
    per_block = (shape[0],) + (1,) * (len(shape) - 1) if tree.is_stacked(path) else None
    if s.ndim != 0 and s.shape != per_block:
        raise ValueError(f"scale for {path!r} has shape {s.shape}; expected a scalar"
                         + (f" or {list(per_block)}, one per block" if per_block else ""))
    return s


def apply_delta(base: Any, delta: Mapping[str, np.ndarray], *,
                scales: Mapping[str, Any] | Callable[[str], Any] | None = None,
                consume: bool = False, inplace: bool = False) -> Flat:
    """``theta = theta0 + s * D`` for every leaf of the base (``s = 1`` where ``scales`` gives
    none; leaves without a delta are the base's, unchanged).

    ``base``: an opened checkpoint, a path, or a flat ``{path: array}``. ``scales``: ``{path: s}``
    or ``s(path)``; ``s`` is a scalar or, for stacked leaves, one value per block shaped
    ``[B, 1, ..., 1]``. With
    ``consume`` the entries of ``delta`` (a dict) are released as they are used; with
    ``inplace`` as well (float32 delta arrays nobody else holds, as :func:`merge_delta` returns),
    each ``theta`` is computed in its delta's memory (no second model-sized allocation).
    """
    if inplace and not consume:
        raise ValueError("apply_delta(inplace=True) needs consume=True")
    if isinstance(base, Mapping):
        paths = list(base)
        get = lambda p: np.array(base[p], dtype=np.float32)  # noqa: E731  (a copy: ours to add to)
    else:
        base = open_source(base)
        paths = list(base.paths())
        get = functools.partial(base.leaf, native=True)  # fresh float32, the stored order
    unknown = sorted(set(delta) - set(paths))
    if unknown:
        raise ValueError(f"delta has leaves the base lacks: {unknown[:5]}")
    out: Flat = {}
    for p in paths:
        if inplace and p in delta and isinstance(delta[p], np.ndarray) \
                and delta[p].dtype == np.float32 and delta[p].flags.writeable:
            d = delta.pop(p)
            s = _scale_for(scales, p, d.shape)
            if s is not None:
                d *= s
            d += get(p)
            out[p] = d
            continue
        theta = get(p)  # keeps the leaf's memory order
        if p in delta:
            d = delta.pop(p) if consume else delta[p]
            s = _scale_for(scales, p, theta.shape)
            theta += d if s is None else s * d
        out[p] = theta
    return out


def merge_checkpoints(base: Any, models: Sequence[Any], method: str, *,
                      scales: Mapping[str, Any] | Callable[[str], Any] | None = None,
                      **kwargs: Any) -> tuple[Flat, dict]:
    """:func:`merge_delta` then :func:`apply_delta`: ``(merged flat params, report)``.

    ``kwargs`` are those of :func:`merge_delta` (``svc``, ``svc_alpha``, ``hash_inputs``, method
    hyperparameters); ``scales`` those of :func:`apply_delta` (the LARV veneer's per-leaf ``s``).
    """
    base = open_source(base)
    delta, report = merge_delta(base, models, method, **kwargs)
    t0 = time.perf_counter()
    params = apply_delta(base, delta, scales=scales, consume=True, inplace=True)
    report["timings"]["apply_s"] = time.perf_counter() - t0
    report["scaled"] = scales is not None
    return params, report
