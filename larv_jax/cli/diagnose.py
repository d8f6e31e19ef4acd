"""``larv diagnose --base B --models M1 M2 ... --out DIR``: per-layer LARV diagnostics of a merge.

Forms the merged update D of the base merger (default Task Arithmetic, lam = 0.3:
D = 0.3 * sum_k tau_k; any ``larv_jax.merging.METHODS`` name with ``--method``), computes the
effective-rank contrast e and commutator conflict c of every LARV unit (SPEC §1-2), and writes
``diagnostics.json``, ``diagnostics.csv`` and ``diagnostics.png`` (e and c against depth) into
``--out``. Nothing is written when an input is bad (shapes differ, non-finite weights, no models).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NamedTuple


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_dry_run_argument, add_output_arguments

    p = sub.add_parser("diagnose", help="per-layer LARV diagnostics (e, c) of a merge",
                       description=__doc__)
    p.add_argument("--base", required=True, type=Path,
                   help="pretrained checkpoint theta0 (HF dir / .safetensors / OpenAI .pt)")
    p.add_argument("--models", required=True, nargs="*", type=Path,
                   help="fine-tuned checkpoints theta_1..theta_K (at least one)")
    p.add_argument("--method", default="task_arithmetic",
                   help="base merger whose delta is diagnosed (default: task_arithmetic, lam 0.3)")
    p.add_argument("--granularity", choices=["module", "block"], default="module",
                   help="LARV units: module (L = 1 + 3B (+1), default) or block (L = B)")
    p.add_argument("--mode", choices=["randomized", "exact"], default="randomized",
                   help="r_eff of the update: randomized SVD with tail completion (default) or "
                   "exact; r_eff of theta0 is always exact")
    p.add_argument("--k", type=int, default=64, help="randomized SVD rank (default 64)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sketch (default 0)")
    add_dry_run_argument(p)
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, required=True,
                         help="output directory (required; refused when it exists, unless "
                              "--overwrite, and always when it is or holds an input)")


class DiagnosePlan(NamedTuple):
    prepared: Any        # larv_jax.merging.engine.Prepared: opened inputs, merged paths
    shapes: dict         # {path: shape} of the vision leaves the merge covers
    units: list          # LARV units
    needed: list[str]    # the matrices the units read
    summary: dict        # the printable / JSON plan


def plan(args: argparse.Namespace) -> DiagnosePlan:
    """Every check ``larv diagnose`` makes before its first weight is read (the output path,
    the inputs opened, keys and shapes through the merge's own
    :func:`larv_jax.merging.engine.prepare`, the units); the error the real run would give."""
    import numpy as np

    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.cli.common import checkpoint_reads, peak_memory
    from larv_jax.cli.flags import check_out
    from larv_jax.larv import plan as L
    from larv_jax.merging import engine

    if not args.models:
        raise ValueError("--models: give at least one fine-tuned checkpoint")
    check_out(args.out, [args.base, *args.models], overwrite=args.overwrite)
    base = load_checkpoint(args.base, act=args.act)
    # fine-tunes share the base's architecture: its activation, unless --act says otherwise
    models = [load_checkpoint(m, act=args.act or base.config.vision.act) for m in args.models]
    prepared = engine.prepare(base, models, args.method)
    base = prepared.base
    # Units over the vision leaves the merge covers (leaves the models lack, e.g. a vision-only
    # fine-tune's missing projection, have no update), as `larv merge --larv` does.
    shapes = {p: base.shape(p) for p in prepared.merged if p.startswith("visual/")}
    units = L.units_for(shapes, None, args.granularity)
    needed = sorted({q for u in units for q, _ in u.matrices})
    size = {p: int(np.prod(base.shape(p))) for p in prepared.merged}
    k = len(prepared.models)
    summary = {
        "reads": checkpoint_reads([("base", base)] + [("model", m) for m in prepared.models]),
        "computes": [f"{args.method} delta over K = {k} task vectors, {len(prepared.merged)} "
                     f"leaves", f"e and c of L = {len(units)} {args.granularity} units "
                     f"({args.mode}, k {args.k}, seed {args.seed}) over {len(needed)} matrices"],
        "writes": [str(args.out / f"diagnostics.{x}") for x in ("json", "csv", "png")],
        "memory": peak_memory({
            "delta_f32": 4 * sum(size.values()),
            "base_matrices_f32": 4 * sum(size[q] for q in needed),
            "one_leaf_task_vectors_f32": 4 * (k + 2) * max(size.values(), default=0)}),
    }
    return DiagnosePlan(prepared, shapes, units, needed, summary)


def run(args: argparse.Namespace) -> int:
    from larv_jax.cli.common import run_planned

    return run_planned(args, "diagnose", plan, execute)


def execute(args: argparse.Namespace, p: DiagnosePlan) -> int:
    """The diagnostics themselves, on a checked :class:`DiagnosePlan`."""
    import jax
    from tqdm import tqdm

    from larv_jax import diagnostics as dg
    from larv_jax.caches import base_cache_dir
    from larv_jax.cli.common import report
    from larv_jax.io import atomic_path
    from larv_jax.larv import plan as L
    from larv_jax.merging import merge_delta

    rep = report(args)
    base, models = p.prepared.base, p.prepared.models
    units, shapes, needed = p.units, p.shapes, p.needed
    t0 = time.perf_counter()
    # The merge checks finiteness as it reads every leaf (errors name the file and key).
    res = merge_delta(base, models, args.method, hash_inputs=False)
    delta = res.delta
    merge_info = {k: v for k, v in res.report.items() if k in ("method", "hparams")}
    base_flat = {q: base.leaf(q, native=True) for q in needed}
    t_load = time.perf_counter() - t0

    cache = dg.base_cache(base_flat, units, store=base_cache_dir())
    n_buckets = len(dg.plan_buckets(units, shapes))
    with tqdm(total=n_buckets, desc="diagnostics (shape buckets)", unit="bucket") as bar:
        lp = L.plan(base_flat, {q: delta[q] for q in needed}, gate="none", units=units,
                    cache=cache, key=jax.random.PRNGKey(args.seed), mode=args.mode,
                    diag_options={"k": args.k, "callback": lambda i, n, b: bar.update(1)},
                    always_diagnose=True)
    diag = lp.diagnostics
    t_diag = time.perf_counter() - t0 - t_load
    diag.settings.update(seed=args.seed, base=str(args.base),
                         models=[str(m) for m in args.models], merge=merge_info,
                         timings={"load_merge_s": t_load, "diagnose_s": t_diag})

    with atomic_path(args.out, is_dir=True) as tmp:
        dg.to_json(diag, tmp / "diagnostics.json")
        dg.to_csv(diag, tmp / "diagnostics.csv")
        dg.plot(diag, tmp / "diagnostics.png",
                title=f"LARV diagnostics: {merge_info.get('method', args.method)}, "
                f"{len(models)} models, {args.mode}")
    rep.input("base", args.base)
    for m in args.models:
        rep.input("model", m)
    rep.output(args.out)
    rep.timings.update(load_merge_s=t_load, diagnose_s=t_diag)
    rep.results.update(method=merge_info.get("method", args.method), num_units=len(units),
                       e_min=float(diag.e.min()), e_max=float(diag.e.max()),
                       c_min=float(diag.c.min()), c_max=float(diag.c.max()),
                       units=[{"name": u.name, "e": float(e), "c": float(c)}
                              for u, e, c in zip(units, diag.e, diag.c, strict=True)])
    print(f"wrote {args.out}/diagnostics.{{json,csv,png}}: L = {len(units)} units, "
          f"e in [{diag.e.min():.3g}, {diag.e.max():.3g}], "
          f"c in [{diag.c.min():.3g}, {diag.c.max():.3g}]")
    return 0
