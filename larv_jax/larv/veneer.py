"""The LARV veneer (SPEC §3, Algorithm 1): per-unit scales on top of any data-free merge.

Data flow (every arrow a function of this module or of the engines it calls)::

    task vectors tau [K, ...] --merger--> D --(SVC)--> D --diagnostics--> e, c --gate--> s[L]
    post (default):  theta = theta0 + s_l * D_l             for every parameter of unit l
    pre:             theta = theta0 + merger(s_l * tau_l)   s from the unscaled first merge

``D`` is the merger's output *including* its own global coefficient (TA's 0.3 etc.). Parameters
outside every LARV unit (text tower, ``logit_scale``) get scale 1, i.e. ``theta0 + D``.

SVC (SPEC §5) composes in either order (``svc_order``): ``"svc_first"`` (default; merge -> SVC ->
LARV: the diagnostics and the scales see the calibrated delta) or ``"larv_first"`` (merge -> LARV ->
SVC: SVC calibrates the already scaled delta). With ``apply="pre"`` the scales act before the
merger, hence before SVC: the first, unscaled pass is merge -> SVC, the diagnostics are taken on its
output, and the final pass is ``svc(merge(s * tau), s * tau)``; ``pre`` with ``larv_first`` is
rejected as contradictory.

A *merger* here is any function ``merge(tau_flat) -> delta_flat`` on flat ``{path: [K, ...]}``
task vectors (:func:`larv_jax.larv.mergers.merger` gets one from the merging registry by name); an
*SVC* is ``svc(delta_flat, tau_flat) -> delta_flat``. Keeping them plain callables lets the veneer run
over every registry entry, presets included, and over user functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from larv_jax import diagnostics as dg
from larv_jax import tree as ltree
from larv_jax.larv import schedules

Flat = dict[str, Any]
MergeFn = Callable[[Mapping[str, Any]], Flat]
SvcFn = Callable[[Mapping[str, Any], Mapping[str, Any]], Flat]

APPLY = ("post", "pre")
SVC_ORDERS = ("svc_first", "larv_first")

# Options of larv_jax.diagnostics.diagnose that callers may pass through ``diag_options``.
DIAG_OPTIONS = ("k", "p", "q", "eps", "zero_rtol", "devices")


class UnitReport(NamedTuple):
    """One row of the per-unit report (``e``, ``c``, ``z``, ``w`` are None when the scales came
    from a depth-only schedule and no diagnostics were computed)."""

    name: str
    depth: int
    e: float | None
    c: float | None
    z: float | None
    w: float | None
    s: float


def as_flat(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Flat ``{path: leaf}`` view of a nested or already flat parameter tree. Only plain dicts
    can be nested; any other Mapping (e.g. the lazy :class:`larv_jax.merging.TaskVectors`) is
    flat by contract and returned as is, unread."""
    if not isinstance(params, dict):
        return params
    if any(isinstance(v, Mapping) for v in params.values()):
        return ltree.flatten(params)
    return dict(params)


class ScaledTaskVectors(Mapping):
    """Lazy ``{path: s_leaf * tau[path]}`` over a (possibly lazy) task-vector mapping: ``pre``
    keeps the streaming engine streaming (nothing is read until the merger asks for a leaf)."""

    fresh = True

    def __init__(self, tau: Mapping[str, Any], scales: Mapping[str, np.ndarray]):
        self.tau, self.scales = tau, scales
        self.num_tasks = getattr(tau, "num_tasks", None)

    def __getitem__(self, path: str) -> np.ndarray:
        return np.asarray(self.tau[path], np.float32) * self.scales[path]

    def __iter__(self):
        return iter(self.tau)

    def __len__(self) -> int:
        return len(self.tau)

    def __contains__(self, path: object) -> bool:
        return path in self.tau


def _shapes(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {p: tuple(np.shape(v)) for p, v in flat.items()}


def units_for(base_flat: Mapping[str, Any], covered: Mapping[str, Any] | None = None,
              granularity: str = "module") -> list[dg.Unit]:
    """LARV units over the base parameters that the merge covers (``covered``: the delta or task
    vectors; all of the base when None). A vision-only fine-tune of a full CLIP base thus gets the
    37 units of a ViT-B/32 vision tower, not a 38th for the untouched ``visual/proj``."""
    shapes = {p: tuple(np.shape(v)) for p, v in base_flat.items()
              if covered is None or p in covered}
    return dg.units(shapes, granularity=granularity)


def scale_tree(unit_list: Sequence[dg.Unit], s: Any, shapes: Mapping[str, Sequence[int]]
               ) -> dict[str, np.ndarray]:
    """Per-leaf float32 scales (host numpy): ``[]`` for an unstacked leaf, ``[B, 1, ..]`` for a
    stacked one; leaves outside every unit get 1 (wraps
    :func:`larv_jax.diagnostics.unit_scales_to_tree`)."""
    s32 = np.asarray(s, dtype=np.float32)
    tree = dg.unit_scales_to_tree(unit_list, s32, shapes, fill=1.0)
    return {p: np.asarray(v, dtype=np.float32) for p, v in tree.items()}


def apply_scales(base_flat: Mapping[str, Any], delta_flat: Mapping[str, Any],
                 unit_list: Sequence[dg.Unit], s: Any) -> Flat:
    """``theta = theta0 + s_l * D_l`` leaf by leaf (SPEC §3, ``apply="post"``).

    Args:
      base_flat: ``{path: [..]}`` theta0, Flax layout, stacked blocks ``[B, ..]``.
      delta_flat: ``{path: [..]}`` merged delta D (same shapes); a path it lacks stays at theta0.
      unit_list: LARV units (:func:`larv_jax.diagnostics.units`).
      s: ``[L]`` per-unit scales (cast to float32).

    Returns the flat float32 parameters in ``base_flat``'s order. With every ``s_l = 1`` this is
    ``theta0 + D`` bit for bit; a leaf with ``D = 0`` stays exactly at theta0.
    """
    extra = sorted(set(delta_flat) - set(base_flat))
    if extra:
        raise ValueError(f"merged delta has parameters the base lacks: {extra[:5]}")
    scales = scale_tree(unit_list, s, _shapes(base_flat))
    out: Flat = {}
    for path, base in base_flat.items():
        base = np.asarray(base)
        if path not in delta_flat:
            out[path] = base
            continue
        delta = np.asarray(delta_flat[path])
        if delta.shape != base.shape:
            raise ValueError(f"parameter {path!r}: base shape {base.shape} != delta shape "
                             f"{delta.shape}")
        out[path] = (base + scales[path] * delta).astype(base.dtype, copy=False)
    return out


def scale_task_vectors(tau_flat: Mapping[str, Any], unit_list: Sequence[dg.Unit], s: Any,
                       shapes: Mapping[str, Sequence[int]]) -> Flat:
    """``s_l * tau_{i,l}`` for every task i (``apply="pre"``); ``tau_flat`` leaves are
    ``[K, ..]`` (or ``[..]``: a single delta) over the parameter ``shapes`` (the per-leaf scales
    broadcast from the right). A lazy (non-dict) mapping gives a lazy :class:`ScaledTaskVectors`."""
    scales = scale_tree(unit_list, s, shapes)
    if not isinstance(tau_flat, dict):
        return ScaledTaskVectors(tau_flat, scales)
    return {p: np.asarray(t) * scales[p] for p, t in tau_flat.items()}


def gate_scales(gate: str, unit_list: Sequence[dg.Unit],
                diagnostics: dg.Diagnostics | None = None, **options: Any
                ) -> tuple[schedules.Scales, list[UnitReport]]:
    """Scales ``s[L]`` and the per-unit report for a gate/schedule spec
    (:func:`larv_jax.larv.schedules.compute_scales`)."""
    e = c = None
    if diagnostics is not None:
        if [u.name for u in diagnostics.units] != [u.name for u in unit_list]:
            raise ValueError("diagnostics were computed for different LARV units")
        e, c = diagnostics.e, diagnostics.c
    res = schedules.compute_scales(gate, e=e, c=c, num_units=len(unit_list), **options)
    f = lambda v, i: None if v is None else float(v[i])  # noqa: E731
    rows = [UnitReport(u.name, u.depth, f(e, i), f(c, i), f(res.z, i), f(res.w, i),
                       float(res.s[i])) for i, u in enumerate(unit_list)]
    return res, rows


def needs_diagnostics(gate: str) -> bool:
    """True when the spec is a score gate (tiered, continuous) that needs e and c."""
    name, _, _ = schedules.parse_spec(gate)
    return schedules.SCALERS[name].uses_scores


def diagnose(base_flat: Mapping[str, Any], delta_flat: Mapping[str, Any],
             unit_list: Sequence[dg.Unit], *, key: jax.Array | None = None,
             mode: str = "randomized", cache: dg.BaseCache | None = None,
             **diag_options: Any) -> dg.Diagnostics:
    """:func:`larv_jax.diagnostics.diagnose` with the veneer's defaults (key 0, randomized)."""
    bad = sorted(set(diag_options) - set(DIAG_OPTIONS))
    if bad:
        raise ValueError(f"unknown diagnostics option(s) {bad}; valid: {list(DIAG_OPTIONS)}")
    key = jax.random.PRNGKey(0) if key is None else key
    return dg.diagnose(base_flat, delta_flat, units=unit_list, key=key, mode=mode, cache=cache,
                       **diag_options)


class LarvResult(NamedTuple):
    """What :func:`veneer` and :func:`larv_merge` return besides the parameters."""

    report: list[UnitReport]
    s: np.ndarray  # [L]
    diagnostics: dg.Diagnostics | None
    delta: Flat  # the merged delta the scales were applied to (post) or the final delta (pre)


def veneer(base: Mapping[str, Any], delta: Mapping[str, Any], *, gate: str = "tiered",
           granularity: str = "module", unit_list: Sequence[dg.Unit] | None = None,
           diagnostics: dg.Diagnostics | None = None, cache: dg.BaseCache | None = None,
           key: jax.Array | None = None, mode: str = "randomized",
           diag_options: Mapping[str, Any] | None = None, always_diagnose: bool = False,
           **gate_options: Any) -> tuple[Flat, LarvResult]:
    """LARV post-hoc on a given merged delta: ``theta = theta0 + s * D`` (``apply="post"``).

    Args:
      base, delta: theta0 and the merged delta D (nested or flat; Flax layout).
      gate: gate or schedule spec (``"tiered"``, ``"continuous"``, ``"thirds(0,1,1.5)"``, ...).
      granularity / unit_list: LARV units (``module`` default, SPEC §1), or the list itself.
      diagnostics: precomputed e, c for this (base, D); computed here when a score gate needs them
        (or ``always_diagnose``), with ``cache`` (a :class:`larv_jax.diagnostics.BaseCache`),
        ``key``, ``mode`` and ``diag_options`` (k, p, q, eps, zero_rtol, devices).
      **gate_options: options of the gate and score (``alpha``, ``gamma``, ``eta``, ``use_c``...).

    Returns ``(params_flat, LarvResult)``.
    """
    base_flat, delta_flat = as_flat(base), as_flat(delta)
    if unit_list is None:
        unit_list = units_for(base_flat, delta_flat, granularity)
    if diagnostics is None and (always_diagnose or needs_diagnostics(gate)):
        diagnostics = diagnose(base_flat, delta_flat, unit_list, key=key, mode=mode, cache=cache,
                               **dict(diag_options or {}))
    res, rows = gate_scales(gate, unit_list, diagnostics, **gate_options)
    return apply_scales(base_flat, delta_flat, unit_list, res.s), LarvResult(
        rows, res.s, diagnostics, delta_flat)


def task_vectors(base: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> Flat:
    """Flat ``{path: [K, ..]}`` task vectors ``tau_k = theta_k - theta0`` over the models' paths.

    Every model must have the same paths, all present in the base with the same shapes (a
    vision-only fine-tune of a full CLIP base gives task vectors of the vision tower only).
    """
    base_flat = as_flat(base)
    flats = [as_flat(m) for m in models]
    if not flats:
        raise ValueError("no models to merge")
    paths = list(flats[0])
    for i, f in enumerate(flats[1:], start=1):
        if set(f) != set(paths):
            diff = sorted(set(f) ^ set(paths))[:5]
            raise ValueError(f"model {i} has different parameters than model 0: {diff}")
    out: Flat = {}
    for p in paths:
        if p not in base_flat:
            raise ValueError(f"parameter {p!r} of the fine-tuned models is missing in the base")
        b = np.asarray(base_flat[p], dtype=np.float32)
        leaves = [np.asarray(f[p], dtype=np.float32) for f in flats]
        for i, x in enumerate(leaves):
            if x.shape != b.shape:
                raise ValueError(f"model {i}: parameter {p!r} has shape {x.shape}, base {b.shape}")
        out[p] = np.stack([x - b for x in leaves])
    return out


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def larv_merge(base: Any, models: Any, *, method: str | MergeFn = "task_arithmetic",
               gate: str = "tiered", apply: str = "post", svc: bool | SvcFn | None = None,
               svc_order: str = "svc_first", method_options: Mapping[str, Any] | None = None,
               svc_options: Mapping[str, Any] | None = None,
               granularity: str = "module", unit_list: Sequence[dg.Unit] | None = None,
               cache: dg.BaseCache | None = None, key: jax.Array | None = None,
               mode: str = "randomized", diag_options: Mapping[str, Any] | None = None,
               always_diagnose: bool = False, **gate_options: Any) -> tuple[Flat, LarvResult]:
    """Merge with LARV: task vectors -> merger (-> SVC) -> diagnostics -> gate -> veneer.

    Args:
      base: theta0: nested or flat params (Flax layout), or a checkpoint path / opened checkpoint.
      models: task vectors ``{path: [K, ..]}`` (nested, flat or lazy), a sequence of K fine-tuned
        parameter trees, or a sequence of K checkpoint paths / opened checkpoints (then the task
        vectors are the merging engine's lazy :class:`larv_jax.merging.TaskVectors`: the merger
        streams leaf by leaf and K models are never resident).
      method: a :data:`larv_jax.merging.METHODS` name (``method_options`` override its
        hyperparameters; Iso-C's per-backbone scale follows the base checkpoint's config) or a
        callable ``merge(tau_flat) -> delta_flat`` including its own coefficient.
      svc: True (registry SVC with the method's alpha; ``svc_options`` e.g. ``alpha``), a
        callable ``svc(delta_flat, tau_flat) -> delta_flat``, or None/False.
      gate: gate/schedule spec (``"tiered"`` default, ``"continuous"``, ``"none"``,
        ``"thirds(0,1,1.5)"``, ...; :data:`larv_jax.larv.schedules.SCALERS`).
      apply: ``"post"`` (default; ``theta0 + s * D``) or ``"pre"`` (``theta0 + merge(s * tau)``,
        ``s`` from the unscaled first merge; equal to post for linear mergers).
      svc: optional SVC, ``svc(delta_flat, tau_flat) -> delta_flat``; ``svc_order`` is
        ``"svc_first"`` (merge -> SVC -> LARV, default) or ``"larv_first"`` (merge -> LARV -> SVC).
      granularity, unit_list, cache, key, mode, diag_options, always_diagnose, **gate_options: as
        in :func:`veneer`.

    Returns ``(params_flat, LarvResult)``; ``LarvResult.report`` has one
    :class:`UnitReport` (name, depth, e, c, z, w, s) per unit.
    """
    from larv_jax.larv import mergers

    base_flat, tau, model_name = _inputs(base, models)
    if isinstance(method, str):
        method = mergers.merger(method, model=model_name, **dict(method_options or {}))
    elif method_options:
        raise ValueError("method_options apply to registry names; bind them into the callable")
    if svc is True:
        name = getattr(method, "method_name", None)
        svc = mergers.svc(method=name, **dict(svc_options or {}))
    elif not svc:
        svc = None
    check_pair(apply, svc_order, svc)
    if unit_list is None:
        unit_list = units_for(base_flat, tau, granularity)
    delta = first_pass(tau, method=method, svc=svc, svc_order=svc_order, apply=apply)
    diagnostics = None
    if always_diagnose or needs_diagnostics(gate):
        diagnostics = diagnose(base_flat, full_delta(delta, base_flat), unit_list, key=key,
                               mode=mode, cache=cache, **dict(diag_options or {}))
    res, rows = gate_scales(gate, unit_list, diagnostics, **gate_options)
    params, final = compose(base_flat, delta, unit_list, res.s, apply=apply, merge=method,
                            tau=tau, svc=svc, svc_order=svc_order)
    return params, LarvResult(rows, res.s, diagnostics, final)


def _inputs(base: Any, models: Any) -> tuple[Mapping[str, Any], Mapping[str, Any], str | None]:
    """(base flat, task vectors, backbone name or None) from the accepted input forms."""
    from pathlib import Path

    model_name = None
    if isinstance(base, (str, Path)) or not isinstance(base, Mapping):
        from larv_jax.checkpoint import load_checkpoint

        ckpt = load_checkpoint(base) if isinstance(base, (str, Path)) else base
        model_name = getattr(ckpt.config, "name", None)
        base_flat = ckpt.flat()
    else:
        base_flat = as_flat(base)
    if isinstance(models, Mapping):
        return base_flat, as_flat(models), model_name
    models = list(models)
    if models and all(not isinstance(m, Mapping) for m in models):
        from larv_jax.checkpoint import load_checkpoint
        from larv_jax.merging import TaskVectors

        ckpts = [load_checkpoint(m) if isinstance(m, (str, Path)) else m for m in models]
        paths = list(ckpts[0].paths())
        for c in ckpts[1:]:
            if set(c.paths()) != set(paths):
                raise ValueError(f"{getattr(c, 'origin', c)}: parameters differ from the first "
                                 "fine-tuned checkpoint's")
        unknown = [p for p in paths if p not in base_flat]
        if unknown:
            raise ValueError(f"parameter {unknown[0]!r} of the fine-tuned models is not in the base")
        return base_flat, TaskVectors(FlatSource(base_flat), ckpts, paths), model_name
    return base_flat, task_vectors(base_flat, models), model_name


class FlatSource:
    """A flat dict seen as a checkpoint (``leaf``/``shape``/``paths``) for TaskVectors."""

    def __init__(self, flat: Mapping[str, Any]):
        self.flat = flat
        self.origin = "base"

    def paths(self) -> list[str]:
        return list(self.flat)

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(np.shape(self.flat[path]))

    def leaf(self, path: str) -> np.ndarray:
        return np.asarray(self.flat[path], np.float32)


def first_pass(tau: Mapping[str, Any], *, method: MergeFn, svc: SvcFn | None = None,
               svc_order: str = "svc_first", apply: str = "post") -> Flat:
    """The unscaled delta the diagnostics are taken on: ``merge(tau)``, then SVC unless the
    order is ``larv_first`` (then SVC comes after the scales)."""
    check_pair(apply, svc_order, svc)
    delta = method(tau)
    if svc is not None and svc_order == "svc_first":
        delta = svc(delta, tau)
    return delta


def check_pair(apply: str, svc_order: str, svc: SvcFn | None) -> None:
    check_choice("apply mode", apply, APPLY)
    check_choice("svc_order", svc_order, SVC_ORDERS)
    if svc is not None and apply == "pre" and svc_order == "larv_first":
        raise ValueError("apply='pre' scales the task vectors before the merger, so SVC cannot "
                         "come before LARV's scales: use svc_order='svc_first'")


def compose(base_flat: Mapping[str, Any], delta: Mapping[str, Any], unit_list: Sequence[dg.Unit],
            s: Any, *, apply: str = "post", merge: MergeFn | None = None,
            tau: Mapping[str, Any] | None = None, svc: SvcFn | None = None,
            svc_order: str = "svc_first") -> tuple[Flat, Mapping[str, Any]]:
    """Compose scales ``s[L]`` with the first-pass delta (:func:`first_pass`); returns
    ``(params_flat, final_delta)``:

    - ``post`` (no SVC or ``svc_first``): ``theta0 + s * D``;
    - ``post`` + ``larv_first``: ``theta0 + svc(s * D, tau)``;
    - ``pre``: ``theta0 + [svc](merge(s * tau), s * tau)`` (needs ``merge`` and ``tau``).
    """
    check_pair(apply, svc_order, svc)
    shapes = _shapes(base_flat)
    ones = np.ones(len(unit_list))
    if apply == "pre":
        if merge is None or tau is None:
            raise ValueError("apply='pre' needs the merger and the task vectors")
        tau_s = scale_task_vectors(tau, unit_list, s, shapes)
        final = merge(tau_s)
        if svc is not None:
            final = svc(final, tau_s)
        return apply_scales(base_flat, final, unit_list, ones), final
    if svc is not None and svc_order == "larv_first":
        if tau is None:
            raise ValueError("svc_order='larv_first' needs the task vectors")
        final = svc(scale_task_vectors(delta, unit_list, s, shapes), tau)
        return apply_scales(base_flat, final, unit_list, ones), final
    return apply_scales(base_flat, delta, unit_list, s), delta


def full_delta(delta: Mapping[str, Any], base_flat: Mapping[str, Any]) -> Mapping[str, Any]:
    """The delta with zeros for unit matrices it lacks (the diagnostics read every matrix)."""
    missing = [p for p in base_flat if p not in delta and p.startswith("visual/")]
    if not missing:
        return delta
    return {**delta, **{p: np.zeros_like(np.asarray(base_flat[p])) for p in missing}}
