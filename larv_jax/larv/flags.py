"""``--larv`` flags for any command that produces a merged delta (``larv merge``, ``larv demo``).

Wiring, in the command's module::

    from larv_jax.larv import flags as larv_flags          # light: argparse only
    larv_flags.add_arguments(parser)                       # in add_parser()
    params, result = larv_flags.apply(args, base=theta0, delta=D, merge=merge_fn, tau=tau)
                                                           # in run(), after the merge

Flags: ``--larv SPEC`` (``none`` default: the plain merge), ``--larv-set KEY=VALUE`` (repeatable gate
and score options), ``--larv-apply post|pre``, ``--larv-granularity module|block``,
``--larv-mode randomized|exact``, ``--larv-base-mode exact|randomized``, ``--larv-seed N``,
``--larv-k/p/q``, ``--larv-svc-order svc_first|larv_first``.

Module-level imports stay light (argparse): CLI modules are all imported to build the parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SPEC_HELP = ("LARV gate or depth schedule: tiered | continuous | none | uniform(C) | linear | "
             "tier2 | tier3 | tier6 | tier12 | thirds(S_S,S_M,S_D); options in parentheses, e.g. "
             "'tiered(alpha=0.25)' (default: none = the plain merge)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--larv*`` flags (in their own argument group) to ``parser``."""
    g = parser.add_argument_group("LARV veneer (SPEC §3)")
    g.add_argument("--larv", default="none", metavar="SPEC", help=SPEC_HELP)
    g.add_argument("--larv-set", action="append", default=[], metavar="KEY=VALUE",
                   help="gate/score option, repeatable: alpha, beta, tiers=0.5,1,1.5, gamma, "
                        "eta, rho, zeta, use_e, use_r, use_c=false (default: the paper's values)")
    g.add_argument("--larv-apply", choices=("post", "pre"), default="post",
                   help="post: theta0 + s*D; pre: scale each task vector before the merger, s from "
                        "the unscaled merge (default: post)")
    g.add_argument("--larv-granularity", choices=("module", "block"), default="module",
                   help="LARV units: module (L = 1 + 3B (+1)) or block (L = B) (default: module)")
    g.add_argument("--larv-mode", choices=("randomized", "exact"), default="randomized",
                   help="diagnostics of the merged delta (default: randomized)")
    g.add_argument("--larv-base-mode", choices=("exact", "randomized"), default="exact",
                   help="r_eff of the pretrained weights (default: exact)")
    g.add_argument("--larv-seed", type=int, default=0,
                   help="PRNG seed of the randomized SVD (default: 0)")
    g.add_argument("--larv-k", type=int, default=64, help="randomized SVD rank (default: 64)")
    g.add_argument("--larv-p", type=int, default=10, help="oversampling (default: 10)")
    g.add_argument("--larv-q", type=int, default=2, help="power iterations (default: 2)")
    g.add_argument("--larv-svc-order", choices=("svc_first", "larv_first"), default="svc_first",
                   help="with SVC: merge -> SVC -> LARV (svc_first) or merge -> LARV -> SVC "
                        "(default: svc_first)")
    return parser


def enabled(args: argparse.Namespace) -> bool:
    """True when ``--larv`` asks for anything but the plain merge."""
    from larv_jax.larv import schedules

    spec = getattr(args, "larv", "none")
    return not schedules.is_identity(spec, **schedules.parse_options(args.larv_set))


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`larv_jax.larv.veneer.larv_merge` / ``veneer`` from the flags
    (gate options included)."""
    from larv_jax.larv import schedules

    schedules.parse_spec(args.larv)  # unknown names fail here, before any work
    return dict(gate=args.larv, granularity=args.larv_granularity, mode=args.larv_mode,
                diag_options={"k": args.larv_k, "p": args.larv_p, "q": args.larv_q},
                **schedules.parse_options(args.larv_set))


def svc_before_larv(args: argparse.Namespace) -> bool:
    """Whether the merge command should apply SVC to D itself before calling :func:`apply`
    (True unless ``--larv-svc-order larv_first`` with a non-trivial ``--larv``)."""
    return not (enabled(args) and args.larv_svc_order == "larv_first")


def _base_cache(args: argparse.Namespace, base_flat: Mapping[str, Any], unit_list: Any) -> Any:
    """The base cache as the flags ask for it (``--larv-base-mode``, ``--larv-seed``), kept on
    disk in :func:`larv_jax.caches.base_cache_dir` (``LARV_JAX_CACHE_DIR=off``: not kept)."""
    import jax

    from larv_jax import diagnostics as dg
    from larv_jax.caches import base_cache_dir

    return dg.base_cache(base_flat, unit_list, mode=args.larv_base_mode,
                         key=jax.random.PRNGKey(args.larv_seed), store=base_cache_dir())


def _diagnose(args: argparse.Namespace, base_flat: Mapping[str, Any], delta: Mapping[str, Any],
              unit_list: Any, mode: str, diag_options: Mapping[str, Any],
              cache: Any = None) -> Any:
    """Diagnostics of the merged ``delta`` (``cache``: the base cache, computed when None)."""
    import jax

    from larv_jax.larv import veneer as V

    cache = _base_cache(args, base_flat, unit_list) if cache is None else cache
    return V.diagnose(base_flat, V.full_delta(delta, base_flat), unit_list,
                      key=jax.random.PRNGKey(args.larv_seed), mode=mode, cache=cache,
                      **diag_options)


def apply(args: argparse.Namespace, *, base: Mapping[str, Any], delta: Mapping[str, Any],
          merge: Callable | None = None, tau: Mapping[str, Any] | None = None,
          svc: Callable | None = None) -> tuple[dict[str, Any], Any]:
    """Apply the ``--larv*`` flags to a finished merge.

    Args:
      args: parsed arguments (after :func:`add_arguments`).
      base: theta0, flat or nested (Flax layout).
      delta: the merged delta D (including the merger's coefficient), calibrated by SVC when SVC
        is on and :func:`svc_before_larv` is True; the uncalibrated D otherwise.
      merge, tau: the merger ``merge(tau_flat) -> delta_flat`` and the task vectors
        ``{path: [K, ..]}``; needed only for ``--larv-apply pre``.
      svc: ``svc(delta_flat, tau_flat) -> delta_flat`` when SVC is on (needed for
        ``--larv-svc-order larv_first`` and for ``--larv-apply pre``; ignored otherwise).

    Returns ``(params_flat, LarvResult)``; ``--larv none`` gives ``theta0 + D`` bit for bit and a
    report of scales 1.
    """
    from larv_jax.larv import veneer as V

    opts = options(args)
    gate = opts.pop("gate")
    granularity = opts.pop("granularity")
    mode = opts.pop("mode")
    diag_options = opts.pop("diag_options")
    base_flat = V.as_flat(base)
    delta_flat = V.as_flat(delta)
    svc_order = args.larv_svc_order
    if svc is not None and args.larv_apply == "post" and svc_order == "svc_first":
        svc = None  # already in D; compose() would not use it anyway
    V.check_pair(args.larv_apply, svc_order, svc)
    unit_list = V.units_for(base_flat, delta_flat, granularity)
    diagnostics = None
    if V.needs_diagnostics(gate):
        diagnostics = _diagnose(args, base_flat, delta_flat, unit_list, mode, diag_options)
    res, rows = V.gate_scales(gate, unit_list, diagnostics, **opts)
    params, final = V.compose(base_flat, delta_flat, unit_list, res.s, apply=args.larv_apply,
                              merge=merge, tau=None if tau is None else V.as_flat(tau), svc=svc,
                              svc_order=svc_order)
    return params, V.LarvResult(rows, res.s, diagnostics, dict(final))


def start_base_cache(args: argparse.Namespace, base_path: Any, models: Sequence[Any]) -> Any:
    """Start the LARV base cache in a background thread; a ``Future`` for :func:`finish`, or None.

    The base cache (r_eff(theta0) and the base Grams, ~2 s for ViT-B/32) depends on theta0 and
    the units alone, so the merge command starts it before the merge: its eigenvalue and matrix
    work then overlaps the merge's streaming reads. The thread opens its own view of
    ``base_path``; its units are those of the base leaves that the first model also has (what
    ``merge_delta`` merges). :func:`finish` uses the result only when the merge's own units match
    and recomputes otherwise (also when the thread failed: that error is raised again there).
    None when ``--larv`` needs no diagnostics.
    """
    if not enabled(args):
        return None
    from larv_jax.larv import veneer as V

    opts = options(args)
    if not V.needs_diagnostics(opts["gate"]):
        return None
    covered = set(models[0].paths())

    def work():
        import time

        import jax

        from larv_jax.checkpoint import load_checkpoint

        t0 = time.perf_counter()
        base_flat = load_checkpoint(base_path).flat(native=True)
        unit_list = V.units_for(base_flat, {p: None for p in base_flat if p in covered},
                                opts["granularity"])
        cache = _base_cache(args, base_flat, unit_list)
        jax.block_until_ready([x for x in (*cache.reff, *cache.norm, *cache.gram)
                               if x is not None])
        return base_flat, unit_list, cache, time.perf_counter() - t0

    pool = ThreadPoolExecutor(1, thread_name_prefix="larv-base-cache")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _prefetched(future: Any) -> tuple | None:
    if future is None:
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 -- recomputed in the caller's thread, which raises it properly
        return None


def finish(args: argparse.Namespace, base: Any, delta: Mapping[str, Any], *,
           models: Any = None, method: str | None = None,
           hparams: Mapping[str, Any] | None = None,
           prefetched: Any = None) -> tuple[Mapping[str, Any], Any, Any]:
    """The merge command's hook between ``merge_delta`` and ``apply_delta`` (larv_jax.merging).

    Args:
      args: parsed arguments (``--larv*``; ``args.svc`` / ``args.svc_alpha`` if the command has
        them).
      base: the opened base checkpoint (or a flat dict). delta: ``merge_delta(...).delta``, made
        with ``svc=args.svc and svc_before_larv(args)``.
      models, method, hparams: the opened fine-tuned checkpoints, the registry name and the
        hyperparameters given to ``merge_delta``; needed for ``--larv-apply pre`` and for
        ``--larv-svc-order larv_first`` (they re-merge / calibrate through the same engine).
      prefetched: the future of :func:`start_base_cache` (or None).

    Returns ``(delta, scales, report)`` for ``apply_delta(base, delta, scales=scales)``: ``scales``
    is ``{path: scalar or [B]}`` (post) or None (``--larv none``, or pre / larv_first, where the
    returned delta already carries the scales); ``report`` is a JSON-friendly dict (None for
    ``--larv none``).
    """
    if not enabled(args):
        return delta, None, None
    import numpy as np

    from larv_jax.larv import mergers
    from larv_jax.larv import veneer as V

    pre = _prefetched(prefetched)
    # the source's memory order, like the merged delta: theta0 + s * D then needs no transposes
    base_flat = (base if isinstance(base, Mapping) else
                 pre[0] if pre is not None else base.flat(native=True))
    svc_on = bool(getattr(args, "svc", False))
    merge = svc = tau = None
    needs_engine = args.larv_apply == "pre" or (svc_on and args.larv_svc_order == "larv_first")
    if needs_engine:
        if models is None or method is None:
            raise ValueError("--larv-apply pre / --larv-svc-order larv_first need the models and "
                             "the method name")
        from larv_jax.merging import TaskVectors

        name = getattr(getattr(base, "config", None), "name", None)
        merge = mergers.merger(method, model=name, **dict(hparams or {}))
        src = V.FlatSource(base_flat) if isinstance(base, Mapping) else base
        tau = TaskVectors(src, list(models), list(delta))
        if svc_on:
            alpha = getattr(args, "svc_alpha", None)
            svc = mergers.svc(method, **({} if alpha is None else {"alpha": alpha}))
    opts = options(args)
    gate = opts.pop("gate")
    unit_list = V.units_for(base_flat, delta, opts.pop("granularity"))
    mode, diag_options = opts.pop("mode"), opts.pop("diag_options")
    diagnostics = None
    cache_s = cache_source = None
    if V.needs_diagnostics(gate):
        if pre is not None and pre[1] == unit_list:
            cache, cache_s = pre[2], pre[3]
        else:  # no prefetch, a failed one, or one for other units: computed here
            cache = _base_cache(args, base_flat, unit_list)
        cache_source = cache.source
        diagnostics = _diagnose(args, base_flat, delta, unit_list, mode, diag_options, cache)
    res, rows = V.gate_scales(gate, unit_list, diagnostics, **opts)
    report = {"spec": gate, "options": opts, "apply": args.larv_apply,
              "base_cache_overlapped_s": cache_s, "base_cache_source": cache_source,
              "svc_order": args.larv_svc_order if svc_on else None,
              "granularity": args.larv_granularity,
              "diagnostics": None if diagnostics is None else diagnostics.settings,
              "units": [r._asdict() for r in rows]}
    if needs_engine:
        _, final = V.compose(base_flat, delta, unit_list, res.s, apply=args.larv_apply,
                             merge=merge, tau=tau, svc=svc, svc_order=args.larv_svc_order)
        return final, None, report
    shapes = {p: np.shape(v) for p, v in base_flat.items()}
    tree = V.scale_tree(unit_list, res.s, shapes)
    scales = {p: (v.reshape(-1) if v.ndim else v) for p, v in tree.items() if p in delta}
    return delta, scales, report


def format_report(result: Any) -> str:
    """The per-unit report as a fixed-width text table (name, depth, e, c, z, w, s)."""
    f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"{'unit':<12} {'depth':>5} {'e':>9} {'c':>9} {'z':>9} {'w':>9} {'s':>7}"]
    for r in result.report:
        lines.append(f"{r.name:<12} {r.depth:>5} {f(r.e):>9} {f(r.c):>9} {f(r.z):>9} "
                     f"{f(r.w):>9} {r.s:>7.4g}")
    return "\n".join(lines)


def report_rows(result: Any) -> list[dict[str, Any]]:
    """JSON-friendly per-unit report."""
    return [r._asdict() for r in result.report]
