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


def add_parser(sub) -> None:
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
    p.add_argument("--out", required=True, type=Path, help="output directory")


def _merged_delta(base, models, method: str):
    """``(flat delta, report)`` of the base merger over the vision tower."""
    try:
        from larv_jax.merging import merge_delta
    except ImportError:  # pragma: no cover - the merging package is part of the install
        merge_delta = None
    if merge_delta is not None:
        res = merge_delta(base, models, method, hash_inputs=False)
        return res.delta, {k: v for k, v in res.report.items() if k in ("method", "hparams")}
    if method != "task_arithmetic":
        raise ValueError(f"--method {method!r} needs larv_jax.merging; only task_arithmetic "
                         "is built in")
    import numpy as np

    delta = {}
    for path in base.paths():
        acc = np.zeros(base.shape(path), np.float32)
        theta0 = base.leaf(path)
        for m in models:
            if path not in m.paths() or tuple(m.shape(path)) != tuple(base.shape(path)):
                raise ValueError(f"{m.origin}: parameter {path!r} missing or shaped "
                                 f"differently from the base {tuple(base.shape(path))}")
            leaf = m.leaf(path)
            if not np.isfinite(leaf).all():
                raise ValueError(f"{m.origin}: parameter {path!r} has non-finite values")
            acc += leaf - theta0
        delta[path] = 0.3 * acc
    return delta, {"method": "task_arithmetic", "hparams": {"scale": 0.3}}


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from larv_jax import diagnostics as dg
    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.io import atomic_path

    if not args.models:
        raise ValueError("--models: give at least one fine-tuned checkpoint")
    t0 = time.perf_counter()
    base = load_checkpoint(args.base)
    models = [load_checkpoint(m) for m in args.models]
    shapes = {p: base.shape(p) for p in base.paths() if p.startswith("visual/")}
    units = dg.units(shapes, args.granularity)
    needed = sorted({p for u in units for p, _ in u.matrices})
    for m in models:
        for p in needed:
            if p not in m.paths():
                raise ValueError(f"{m.origin}: parameter {p!r} is missing")
            if tuple(m.shape(p)) != tuple(shapes[p]):
                raise ValueError(f"{m.origin}: parameter {p!r} has shape {tuple(m.shape(p))}; "
                                 f"the base {args.base} has {tuple(shapes[p])}")
    delta, merge_info = _merged_delta(base, models, args.method)
    base_flat = {}
    for p in needed:
        leaf = base.leaf(p)
        if not np.isfinite(leaf).all():
            raise ValueError(f"{args.base}: parameter {p!r} has non-finite values")
        base_flat[p] = leaf
        if p not in delta:
            raise ValueError(f"merged update lacks parameter {p!r}")
        if not np.isfinite(delta[p]).all():
            raise ValueError(f"merged update: parameter {p!r} has non-finite values")
    t_load = time.perf_counter() - t0

    key = jax.random.PRNGKey(args.seed)
    cache = dg.base_cache(base_flat, units)
    n_buckets = len(dg.plan_buckets(units, shapes))
    with tqdm(total=n_buckets, desc="diagnostics (shape buckets)", unit="bucket") as bar:
        diag = dg.diagnose(base_flat, {p: delta[p] for p in needed}, units=units, key=key,
                           mode=args.mode, k=args.k, cache=cache,
                           callback=lambda i, n, b: bar.update(1))
    diag.settings.update(seed=args.seed, base=str(args.base),
                         models=[str(m) for m in args.models], merge=merge_info,
                         timings={"load_merge_s": t_load,
                                  "diagnose_s": time.perf_counter() - t0 - t_load})

    with atomic_path(args.out, is_dir=True) as tmp:
        dg.to_json(diag, tmp / "diagnostics.json")
        dg.to_csv(diag, tmp / "diagnostics.csv")
        dg.plot(diag, tmp / "diagnostics.png",
                title=f"LARV diagnostics: {merge_info.get('method', args.method)}, "
                f"{len(models)} models, {args.mode}")
    print(f"wrote {args.out}/diagnostics.{{json,csv,png}}: L = {len(units)} units, "
          f"e in [{diag.e.min():.3g}, {diag.e.max():.3g}], "
          f"c in [{diag.c.min():.3g}, {diag.c.max():.3g}]")
    return 0
