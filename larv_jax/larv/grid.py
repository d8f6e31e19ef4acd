"""Experiment grids: mergers x gates x options over one base and one set of task vectors, a loop
over :func:`larv_jax.larv.plan.plan` and :func:`larv_jax.larv.plan.apply`.

What is expensive is computed once and reused across the grid:

- the task vectors (formed once by the caller and passed in),
- the base cache (r_eff(theta0) and the base Grams, :func:`larv_jax.diagnostics.base_cache`), once
  per grid,
- each merger's delta D (and its SVC-calibrated version) and the diagnostics of that delta, once per
  merger entry; every gate, option and apply mode of that merger reuses them. Only ``apply="pre"``
  merges again (it has to: the merger sees the scaled task vectors).

:func:`run_grid` yields one JSON-friendly row per (merger, gate) cell and counts its expensive calls in
``counters`` so callers (and tests) can check the reuse. Evaluation is an optional callable
``evaluate(params_flat) -> dict`` (e.g. built on :func:`larv_jax.eval.evaluate` by the CLI).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from larv_jax import diagnostics as dg
from larv_jax.larv import plan as L
from larv_jax.larv import schedules

MergeResolver = Callable[..., L.MergeFn]
SvcResolver = Callable[..., L.SvcFn]


def _tier_counts(s: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.round(s, 6), return_counts=True)
    if values.size > 6:
        return {}
    return {f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)}


def run_grid(*, base: Mapping[str, Any], tau: Mapping[str, Any],
             mergers: Sequence[Mapping[str, Any]], gates: Sequence[Mapping[str, Any]],
             resolve_merger: MergeResolver, resolve_svc: SvcResolver | None = None,
             granularity: str = "module", diag_mode: str = "randomized",
             base_mode: str = "exact", seed: int = 0,
             diag_options: Mapping[str, Any] | None = None,
             evaluate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             counters: collections.Counter | None = None,
             on_diagnostics: Callable[[str, dg.Diagnostics], None] | None = None,
             base_store: str | os.PathLike | None = None,
             on_params: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
             ) -> Iterator[dict[str, Any]]:
    """Run every ``mergers x gates`` cell; yield one result row per cell.

    Args:
      base: theta0 (flat or nested, Flax layout). tau: task vectors ``{path: [K, ..]}``.
      mergers: entries ``{"name": label, "method": registry name, "options": {...},
        "svc": bool, "svc_options": {...}, "svc_order": "svc_first" | "larv_first"}``
        (only ``method`` is required).
      gates: entries ``{"gate": spec, "options": {...}, "apply": "post" | "pre", "name": label}``
        (only ``gate`` is required). ``options`` hold gate and score options (``alpha``,
        ``use_c``, ...).
      resolve_merger: ``resolve_merger(method, **options) -> merge(tau_flat) -> delta_flat``
        (:func:`larv_jax.merging.registry.bind`). resolve_svc: ``resolve_svc(method,
        **svc_options) -> svc`` (:func:`larv_jax.merging.registry.bind_svc`).
      granularity: LARV units (``module`` | ``block``).
      diag_mode / base_mode: diagnostics mode of D and of the base cache; ``seed`` keys the
        randomized SVD; ``diag_options`` (k, p, q, eps, zero_rtol) pass through.
      evaluate: optional ``evaluate(params_flat) -> dict`` stored under ``"eval"``.
      counters: a Counter incremented with ``merge``, ``svc``, ``diagnostics``, ``base_cache``.
      on_diagnostics: called as ``on_diagnostics(merger_label, diagnostics)`` once per merger.
      on_params: called as ``on_params(row, params_flat)`` per cell (e.g. to save the model).
      base_store: directory of the on-disk base cache (``base_cache(store=...)``; None: none).

    Yields rows ``{"merger", "method", "method_options", "svc", "svc_order", "gate", "gate_spec",
    "gate_options", "apply", "units": [per-unit report dicts], "s": [L], "tiers": {value: count},
    "delta_norm", "update_norm", "merge_seconds", "diag_seconds", "seconds", "eval"?}``.
    """
    counters = collections.Counter() if counters is None else counters
    base_flat = L.as_flat(base)
    tau = L.as_flat(tau)
    unit_list = L.units_for(base_flat, tau, granularity)
    key = jax.random.PRNGKey(seed)
    diag_options = dict(diag_options or {})
    needs_diag = any(L.needs_diagnostics(g["gate"]) for g in gates)
    cache = None
    for g in gates:  # validate every cell before the first (slow) merge
        schedules.parse_spec(g["gate"])
        for m in mergers:
            L.check_modes(g.get("apply", "post"), m.get("svc_order", "svc_first"),
                          bool(m.get("svc")))

    for m in mergers:
        t0 = time.perf_counter()
        method = m["method"]
        label = m.get("name", method)
        merge = resolve_merger(method, **dict(m.get("options") or {}))
        svc = None
        if m.get("svc"):
            if resolve_svc is None:
                raise ValueError(f"merger {label!r} asks for SVC but no SVC resolver was given")
            svc = resolve_svc(method, **dict(m.get("svc_options") or {}))
        svc_order = m.get("svc_order", "svc_first")
        counted_merge = _counting(merge, counters, "merge")
        counted_svc = None if svc is None else _counting(svc, counters, "svc")
        delta = counted_merge(tau)  # once per merger entry; SVC here unless it comes after LARV
        if counted_svc is not None and svc_order == "svc_first":
            delta = counted_svc(delta, tau)
        merge_seconds = time.perf_counter() - t0
        diagnostics = None
        t0 = time.perf_counter()
        if needs_diag:
            if cache is None:
                counters["base_cache"] += 1
                cache = dg.base_cache(base_flat, unit_list, mode=base_mode, key=key,
                                      store=base_store)
            counters["diagnostics"] += 1
            diagnostics = L.plan(base_flat, delta, gate="none", units=unit_list, cache=cache,
                                 key=key, mode=diag_mode, diag_options=diag_options,
                                 always_diagnose=True).diagnostics
            if on_diagnostics is not None:
                on_diagnostics(label, diagnostics)
        diag_seconds = time.perf_counter() - t0

        for g in gates:
            t1 = time.perf_counter()
            spec, apply = g["gate"], g.get("apply", "post")
            options = dict(g.get("options") or {})
            p = L.plan(base_flat, delta, gate=spec, units=unit_list, diagnostics=diagnostics,
                       **options)
            params = L.apply(base_flat, delta, p, mode=apply, merge=counted_merge, tau=tau,
                             svc=counted_svc, svc_order=svc_order)
            row: dict[str, Any] = {
                "merger": label, "method": method, "method_options": dict(m.get("options") or {}),
                "svc": bool(svc), "svc_order": svc_order if svc else None,
                "gate": g.get("name") or schedules.describe(spec, **options), "gate_spec": spec,
                "gate_options": options, "apply": apply,
                "units": [r._asdict() for r in p.report()], "s": p.s.tolist(),
                "tiers": _tier_counts(p.s),
                "delta_norm": _norm(delta),
                "update_norm": float(np.sqrt(sum(
                    float(np.sum((params[q] - base_flat[q]).astype(np.float64) ** 2))
                    for q in base_flat))),
                "merge_seconds": merge_seconds,  # once per merger entry, shared by its gates
                "diag_seconds": diag_seconds,  # idem (includes the one-off base cache)
                "seconds": time.perf_counter() - t1,  # this cell: plan + apply (+ pre merge)
            }
            if evaluate is not None:
                counters["eval"] += 1
                row["eval"] = evaluate(params)
            if on_params is not None:
                on_params(row, params)
            yield row


def _counting(fn: Callable, counters: collections.Counter, name: str) -> Callable:
    def wrapped(*args, **kwargs):
        counters[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def _norm(flat: Mapping[str, Any]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2))
                             for v in flat.values())))
