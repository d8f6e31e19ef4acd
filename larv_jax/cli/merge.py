"""``larv merge --base B --models M1 M2 ... --method NAME --out DIR``: data-free merging.

Streams the checkpoints leaf by leaf (larv_jax.merging.merge_delta), applies theta0 + D, and
writes a Hugging Face directory (model.safetensors + config.json, the base's architecture) plus
merge_report.json, atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments

    p = sub.add_parser("merge", help="merge fine-tuned checkpoints (optionally with LARV)",
                       description=__doc__)
    p.add_argument("--base", required=True, type=Path,
                   help="pretrained checkpoint theta0 (HF dir / .safetensors / OpenAI .pt)")
    p.add_argument("--models", required=True, nargs="+", type=Path,
                   help="fine-tuned checkpoints theta_1..theta_K (same keys and shapes)")
    from larv_jax.merging.registry import METHODS

    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="base merger (SPEC §4); its defaults are FusionBench's")
    p.add_argument("--scale", type=float, default=None,
                   help="the method's global coefficient (default: the method's own, e.g. TA "
                   "0.3, TIES 0.3, Iso-C by backbone; not for simple_average / dare_average)")
    p.add_argument("--svc", action="store_true", help="apply singular value calibration (SPEC §5); "
                   "default: off")
    p.add_argument("--svc-alpha", type=float, default=None,
                   help="SVC alpha (default: by method, 0.1; 0.2 Iso-CTS; 1.0 TSV-M)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter, e.g. --set keep=0.1 --set p=0.9 "
                   "(value parsed as a Python literal, else a string); default: none")
    p.add_argument("--seed", type=int, default=None,
                   help="PRNG seed for DARE's masks (default: 0, the method's default key)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out "
                   "(default: refuse)")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the inputs' sha256 in the report (default: hash them)")
    p.add_argument("--out", required=True, type=Path, help="output directory (HF format)")
    from larv_jax.cli.flags import add_larv_arguments

    add_larv_arguments(p)
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)


def _start_base_cache(base_path: Path, units, lk: dict, act: str):
    """The LARV base cache (r_eff(theta0) and the base Grams, ~2 s for ViT-B/32), started in a
    background thread: it depends on theta0 and the units alone, so its eigenvalue and matrix
    work overlaps the merge's streaming reads. The thread opens its own view of ``base_path``.
    Returns a ``Future`` of ``(base_flat, cache, seconds)``."""
    from concurrent.futures import ThreadPoolExecutor

    def work():
        import time

        import jax

        from larv_jax import diagnostics as dg
        from larv_jax.caches import base_cache_dir
        from larv_jax.checkpoint import load_checkpoint

        t0 = time.perf_counter()
        base_flat = load_checkpoint(base_path, act=act).flat(native=True)
        cache = dg.base_cache(base_flat, units, mode=lk["base_mode"],
                              key=jax.random.PRNGKey(lk["seed"]), store=base_cache_dir())
        jax.block_until_ready([x for x in (*cache.reff, *cache.norm, *cache.gram)
                               if x is not None])
        return base_flat, cache, time.perf_counter() - t0

    pool = ThreadPoolExecutor(1, thread_name_prefix="larv-base-cache")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _prefetched(future) -> tuple | None:
    if future is None:
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 -- recomputed in the caller's thread, which raises it properly
        return None


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from larv_jax.checkpoint import load_checkpoint, save_hf
    from larv_jax.cli.flags import check_out, larv_kwargs, parse_key_values
    from larv_jax.larv import schedules
    from larv_jax.merging import TaskVectors, apply_delta, bind, bind_svc, merge_delta, registry

    check_out(args.out, [args.base, *args.models], overwrite=args.overwrite)
    hparams = parse_key_values(args.set)
    if args.scale is not None:
        hparams["scale"] = args.scale
    if args.seed is not None:
        hparams["key"] = args.seed
    registry.hparams(args.method, hparams)  # a bad option is an error before any input is read
    lk = larv_kwargs(args)
    larv_on = not schedules.is_identity(lk["gate"], **lk["gate_options"])
    if larv_on:  # jax and the diagnostics only then: a plain merge never imports them
        import jax

        from larv_jax import diagnostics as dg
        from larv_jax.caches import base_cache_dir
        from larv_jax.larv import plan as L

        L.check_modes(lk["apply"], lk["svc_order"], args.svc)  # before the (slow) merge
        needs_diag = L.needs_diagnostics(lk["gate"])
    svc_later = larv_on and args.svc and lk["svc_order"] == "larv_first"
    base = load_checkpoint(args.base, act=args.act)
    # fine-tunes share the base's architecture: its activation, unless --act says otherwise
    models = [load_checkpoint(m, act=args.act or base.config.vision.act) for m in args.models]
    units = prefetched = None
    if larv_on:
        # the units depend on the base's shapes and the merged leaves alone: computed once
        shapes = {p: tuple(base.shape(p)) for p in base.paths()}
        units = L.units_for(shapes, set(models[0].paths()), lk["granularity"])
        if needs_diag:
            prefetched = _start_base_cache(args.base, units, lk, base.config.vision.act)
    delta, report = merge_delta(base, models, args.method, svc=args.svc and not svc_later,
                                svc_alpha=args.svc_alpha, hash_inputs=not args.no_hash, **hparams)
    # LARV veneer (--larv ...): s from (base, delta); theta = theta0 + s * D.
    t0 = time.perf_counter()
    scales = None
    report["larv"] = None
    if larv_on:
        pre = _prefetched(prefetched)
        # the source's memory order, like the merged delta: theta0 + s * D needs no transposes
        base_flat = (pre[0] if pre is not None else base.flat(native=True)) if needs_diag else {}
        cache, cache_s = (pre[1], pre[2]) if pre is not None else (None, None)
        if needs_diag and cache is None:
            cache = dg.base_cache(base_flat, units, mode=lk["base_mode"],
                                  key=jax.random.PRNGKey(lk["seed"]), store=base_cache_dir())
        merge = svc = tau = None
        if lk["apply"] == "pre" or svc_later:  # these re-merge / calibrate through the engine
            merge = bind(args.method, model=base.config.name, **hparams)
            tau = TaskVectors(base, models, list(delta))
            if args.svc:
                svc = bind_svc(args.method, alpha=args.svc_alpha)
        p = L.plan(base_flat, delta, gate=lk["gate"], units=units, cache=cache,
                   key=jax.random.PRNGKey(lk["seed"]), mode=lk["mode"],
                   diag_options=lk["diag_options"], **lk["gate_options"])
        report["larv"] = {
            "spec": lk["gate"], "options": lk["gate_options"], "apply": lk["apply"],
            "base_cache_overlapped_s": cache_s,
            "base_cache_source": None if cache is None else cache.source,
            "svc_order": lk["svc_order"] if args.svc else None,
            "granularity": lk["granularity"],
            "diagnostics": None if p.diagnostics is None else p.diagnostics.settings,
            "units": [r._asdict() for r in p.report()]}
        # what L.apply does, in two steps so that the first pass is released before the apply
        delta, scales = L.compose(p, shapes, delta, apply=lk["apply"], merge=merge, tau=tau,
                                  svc=svc, svc_order=lk["svc_order"])
    report["timings"]["larv_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = apply_delta(base, delta, scales=scales, consume=True, inplace=True)
    report["timings"]["apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = json.dumps(report, indent=2) + "\n"
    save_hf(params, base.config, args.out, overwrite=args.overwrite,
            extra_files={"merge_report.json": text})
    save_s = time.perf_counter() - t0
    print(f"wrote {args.out} ({args.method}, K={len(models)}, merge "
          f"{report['timings']['merge_s']:.1f}s, save {save_s:.1f}s)")
    return 0
