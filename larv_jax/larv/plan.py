"""The LARV veneer (SPEC §3, Algorithm 1) as one plan and one apply, on top of any merge.

Every caller (``larv merge``, ``larv diagnose``, ``larv run``, ``larv demo``, the notebook, the
benchmarks) runs the same three steps::

    delta = merge(tau)                           # a bound merger (larv_jax.merging.registry.bind)
    p = plan(base, delta, gate="tiered")         # units -> e, c (diagnostics) -> z, w -> s[L]
    params = apply(base, delta, p)               # theta0 + s * D (larv_jax.merging.apply_delta)

``D`` is the merger's output *including* its own global coefficient (TA's 0.3 etc.). Parameters
outside every LARV unit (text tower, ``logit_scale``) get scale 1, i.e. ``theta0 + D``.

:func:`plan` is pure: it reads the base and the delta, and returns the units and the per-unit
vectors ``e, c, z, w, s`` (``[L]`` each). Its scales reach the parameters in one shape,
:meth:`Plan.leaf_scales` (float32 ``[]`` for an unstacked leaf, ``[B, 1, ..]`` for a stacked one),
which is what :func:`larv_jax.merging.apply_delta` broadcasts.

:func:`apply` composes in the modes of SPEC §3:

- ``post`` (default): ``theta0 + s_l * D_l`` for every parameter of unit l;
- ``pre``: ``theta0 + [svc](merge(s * tau), s * tau)``, ``s`` planned on the unscaled first merge;
- SVC (SPEC §5) before LARV (``svc_order="svc_first"``, default: the caller hands :func:`plan`
  the calibrated delta) or after it (``"larv_first"``: ``theta0 + svc(s * D, tau)``); ``pre``
  with ``larv_first`` is rejected as contradictory.

A *merger* is any ``merge(tau_flat) -> delta_flat`` on flat ``{path: [K, ...]}`` task vectors;
an *SVC* is ``svc(delta_flat, tau_flat) -> delta_flat``.
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
DIAG_OPTIONS = ("k", "p", "q", "eps", "zero_rtol", "devices", "callback")


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


class Plan(NamedTuple):
    """What :func:`plan` returns: the units and the per-unit vectors, all ``[L]`` float64.

    ``e``, ``c``, ``z``, ``w`` and ``diagnostics`` are None when no diagnostics were computed
    (a depth-only schedule that was not asked for them).
    """

    units: tuple[dg.Unit, ...]
    e: np.ndarray | None
    c: np.ndarray | None
    z: np.ndarray | None
    w: np.ndarray | None
    s: np.ndarray
    diagnostics: dg.Diagnostics | None

    def report(self) -> list[UnitReport]:
        """One :class:`UnitReport` (name, depth, e, c, z, w, s) per unit."""
        f = lambda v, i: None if v is None else float(v[i])  # noqa: E731
        return [UnitReport(u.name, u.depth, f(self.e, i), f(self.c, i), f(self.z, i),
                           f(self.w, i), float(self.s[i])) for i, u in enumerate(self.units)]

    def leaf_scales(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        """Per-leaf float32 scales over ``shapes``: ``[]`` for an unstacked leaf, ``[B, 1, ..]``
        for a stacked one; leaves outside every unit get 1."""
        return leaf_scales(self.units, self.s, shapes)


def as_flat(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Flat ``{path: leaf}`` view of a nested or already flat parameter tree (a flat dict is
    returned itself, so ``consume`` releases the caller's entries). Only plain dicts can be
    nested; any other Mapping (e.g. the lazy :class:`larv_jax.merging.TaskVectors`) is flat by
    contract and returned as is, unread."""
    if not isinstance(params, dict):
        return params
    if any(isinstance(v, Mapping) for v in params.values()):
        return ltree.flatten(params)
    return params


def shapes_of(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a flat tree of arrays."""
    return {p: tuple(np.shape(v)) for p, v in flat.items()}


def units_for(shapes: Mapping[str, Sequence[int]], covered: Any = None,
              granularity: str = "module") -> list[dg.Unit]:
    """LARV units over the base parameters that the merge covers.

    ``shapes``: ``{path: shape}`` of the base (or the base leaves themselves); ``covered``: the
    paths the merge changes (the delta, the task vectors, or a collection of paths; all of the
    base when None). A vision-only fine-tune of a full CLIP base thus gets the 37 units of a
    ViT-B/32 vision tower, not a 38th for the untouched ``visual/proj``.
    """
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in shapes.items()
              if covered is None or p in covered}
    return dg.units(shapes, granularity=granularity)


def leaf_scales(unit_list: Sequence[dg.Unit], s: Any, shapes: Mapping[str, Sequence[int]]
                ) -> dict[str, np.ndarray]:
    """Per-unit ``s[L]`` as per-leaf float32 host scales (wraps
    :func:`larv_jax.diagnostics.unit_scales_to_tree`; leaves outside every unit get 1)."""
    s32 = np.asarray(s, dtype=np.float32)
    tree = dg.unit_scales_to_tree(unit_list, s32, shapes, fill=1.0)
    return {p: np.asarray(v, dtype=np.float32) for p, v in tree.items()}


def needs_diagnostics(gate: str) -> bool:
    """True when the spec is a score gate (tiered, continuous) that needs e and c."""
    name, _, _ = schedules.parse_spec(gate)
    return schedules.SCALERS[name].uses_scores


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def check_modes(apply: str, svc_order: str, svc: bool) -> None:
    """ValueError for an unknown apply mode or SVC order, or ``pre`` with ``larv_first``."""
    check_choice("apply mode", apply, APPLY)
    check_choice("svc_order", svc_order, SVC_ORDERS)
    if svc and apply == "pre" and svc_order == "larv_first":
        raise ValueError("apply='pre' scales the task vectors before the merger, so SVC cannot "
                         "come before LARV's scales: use svc_order='svc_first'")


def full_delta(delta: Mapping[str, Any], base_flat: Mapping[str, Any]) -> Mapping[str, Any]:
    """The delta with zeros for unit matrices it lacks (the diagnostics read every matrix)."""
    missing = [p for p in base_flat if p not in delta and p.startswith("visual/")]
    if not missing:
        return delta
    return {**delta, **{p: np.zeros_like(np.asarray(base_flat[p])) for p in missing}}


def plan(base: Mapping[str, Any], delta: Mapping[str, Any], *, gate: str = "tiered",
         granularity: str = "module", units: Sequence[dg.Unit] | None = None,
         diagnostics: dg.Diagnostics | None = None, cache: dg.BaseCache | None = None,
         key: jax.Array | None = None, mode: str = "randomized",
         diag_options: Mapping[str, Any] | None = None, always_diagnose: bool = False,
         **gate_options: Any) -> Plan:
    """LARV's per-unit scales for a merged delta (SPEC §1-3): units, e, c, z, w, s.

    Args:
      base, delta: theta0 and the merged delta D (nested or flat; Flax layout, stacked blocks);
        a unit matrix the delta lacks counts as a zero update.
      gate: gate or schedule spec (``"tiered"``, ``"continuous"``, ``"none"``,
        ``"thirds(0,1,1.5)"``, ...; :data:`larv_jax.larv.schedules.SCALERS`).
      granularity / units: LARV units (``module`` default, SPEC §1) over the leaves the delta
        covers (:func:`units_for`), or the list itself.
      diagnostics: precomputed e, c for this (base, D) and these units; computed here when a
        score gate needs them (or ``always_diagnose``), with ``cache`` (a
        :class:`larv_jax.diagnostics.BaseCache`; an exact one is computed when None), ``key``
        (default ``PRNGKey(0)``), ``mode`` and ``diag_options`` (:data:`DIAG_OPTIONS`).
      **gate_options: options of the gate and score (``alpha``, ``gamma``, ``eta``, ``use_c``...).

    Returns a :class:`Plan`; a schedule whose scales are all 1 (``none``) gives
    ``apply(base, delta, p) == theta0 + D`` bit for bit.
    """
    base_flat, delta_flat = as_flat(base), as_flat(delta)
    bad = sorted(set(diag_options or {}) - set(DIAG_OPTIONS))
    if bad:
        raise ValueError(f"unknown diagnostics option(s) {bad}; valid: {list(DIAG_OPTIONS)}")
    unit_list = tuple(units_for(base_flat, delta_flat, granularity) if units is None else units)
    # needs_diagnostics parses the spec: an unknown name fails before any work
    if diagnostics is None and (needs_diagnostics(gate) or always_diagnose):
        diagnostics = dg.diagnose(
            base_flat, full_delta(delta_flat, base_flat), units=unit_list,
            key=jax.random.PRNGKey(0) if key is None else key, mode=mode, cache=cache,
            **dict(diag_options or {}))
    e = c = None
    if diagnostics is not None:
        if [u.name for u in diagnostics.units] != [u.name for u in unit_list]:
            raise ValueError("diagnostics were computed for different LARV units")
        e, c = diagnostics.e, diagnostics.c
    res = schedules.compute_scales(gate, e=e, c=c, num_units=len(unit_list), **gate_options)
    return Plan(unit_list, e, c, res.z, res.w, res.s, diagnostics)


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


def _scaled(tau: Mapping[str, Any], scales: Mapping[str, np.ndarray]) -> Mapping[str, Any]:
    """``s_leaf * tau`` (leaves ``[K, ..]`` or ``[..]``, scales broadcast from the right); a
    lazy (non-dict) mapping stays lazy."""
    if not isinstance(tau, dict):
        return ScaledTaskVectors(tau, scales)
    return {p: np.asarray(t) * scales[p] for p, t in tau.items()}


def compose(p: Plan, shapes: Mapping[str, Sequence[int]], delta: Mapping[str, Any], *,
            apply: str = "post", merge: MergeFn | None = None,
            tau: Mapping[str, Any] | None = None, svc: SvcFn | None = None,
            svc_order: str = "svc_first") -> tuple[Mapping[str, Any], dict[str, np.ndarray] | None]:
    """``(final delta, per-leaf scales or None)`` for ``theta0 + s * final`` (``shapes``: the
    base's): ``post`` gives ``(D, p.leaf_scales)``; ``post`` + ``larv_first``
    ``(svc(s * D, tau), None)``; ``pre`` ``([svc](merge(s * tau), s * tau), None)`` (needs
    ``merge`` and ``tau``). ``delta`` is the first, unscaled pass (SVC'd unless ``larv_first``)."""
    check_modes(apply, svc_order, svc is not None)
    if apply == "pre":
        if merge is None or tau is None:
            raise ValueError("apply='pre' needs the merger and the task vectors")
        tau_s = _scaled(tau, p.leaf_scales(shapes))
        final = merge(tau_s)
        if svc is not None:
            final = svc(final, tau_s)
        return final, None
    if svc is not None and svc_order == "larv_first":
        if tau is None:
            raise ValueError("svc_order='larv_first' needs the task vectors")
        return svc(_scaled(as_flat(delta), p.leaf_scales(shapes)), tau), None
    return delta, p.leaf_scales(shapes)


def apply(base: Any, delta: Mapping[str, Any], p: Plan | None = None, *, mode: str = "post",
          merge: MergeFn | None = None, tau: Mapping[str, Any] | None = None,
          svc: SvcFn | None = None, svc_order: str = "svc_first", consume: bool = False,
          inplace: bool = False) -> Flat:
    """The merged parameters ``theta0 + s * D`` (SPEC §3) for a :func:`plan` (None: ``s = 1``).

    ``base``: flat or nested theta0, or an opened checkpoint; ``delta``: the first, unscaled
    pass the plan was made on. ``mode``, ``merge``, ``tau``, ``svc``, ``svc_order``: see
    :func:`compose`. ``consume`` / ``inplace``: as :func:`larv_jax.merging.apply_delta` (for a
    delta nobody else holds). Returns the flat float32 parameters in the base's order.
    """
    from larv_jax.merging import apply_delta

    base = as_flat(base) if isinstance(base, Mapping) else base
    scales = None
    if p is not None:
        shapes = (shapes_of(base) if isinstance(base, Mapping)
                  else {q: tuple(base.shape(q)) for q in base.paths()})
        delta, scales = compose(p, shapes, delta, apply=mode, merge=merge, tau=tau, svc=svc,
                                svc_order=svc_order)
    return apply_delta(base, as_flat(delta), scales=scales, consume=consume, inplace=inplace)
