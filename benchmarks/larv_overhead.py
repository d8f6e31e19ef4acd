"""LARV's overhead on top of a merge: merge alone vs merge + LARV, same run, same checkpoints.

    python benchmarks/larv_overhead.py [--preset ViT-B-32] [--tasks 8]
        [--methods task_arithmetic,ties] [--repeats 3] [--workdir DIR] [--quick] [--out FILE]

Generates B/32-shaped (``--preset``) HF checkpoints once under ``--workdir`` (a random vision tower
as the base; each "fine-tuned" model adds a rank-16 update plus small noise), then per method:

- reference, **merge alone**: ``larv_jax.merging.merge_checkpoints(base, models, method)``
  (streaming read of K checkpoints + merge + ``theta0 + D``), the thing LARV sits on;
- **merge + LARV**: ``merge_delta`` + the LARV veneer with default settings: base cache (exact
  r_eff(theta0) and base Grams, :func:`larv_jax.diagnostics.base_cache`), randomized diagnostics of
  D (k=64, p=10, q=2), the tiered gate, ``apply_delta(base, D, scales)``.

The LARV parts run once untimed first (jit compile of the diagnostics kernels: reported as
``compile_s``), then ``--repeats`` times; the merge alone runs once untimed (warm page cache for
both) and ``--repeats`` times. Medians are reported. ``overhead_frac`` counts the base cache in
every merge (one-off use); ``overhead_frac_cached_base`` reuses it (grids, repeated merges of a
base). One JSON line per method to ``--out`` (default ``benchmarks/results/larv_overhead.jsonl``),
plus how far randomized e is from exact e and whether the tier assignment changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def make_checkpoints(workdir: Path, preset: str, tasks: int, quick: bool) -> tuple[Path, list]:
    import numpy as np

    from larv_jax.checkpoint import save_hf
    from larv_jax.models.config import CLIPConfig, VisionConfig, get_preset, param_shapes

    if quick:
        cfg = CLIPConfig(vision=VisionConfig(width=128, layers=2, heads=2, mlp_dim=512,
                                             image_size=64, patch_size=16), name="quick")
    else:
        cfg = get_preset(preset).vision_only()
    tag = f"{cfg.name}_k{tasks}"
    root = workdir / tag
    base_dir = root / "base"
    model_dirs = [root / f"task{k}" for k in range(tasks)]
    if (root / "done").exists():
        return base_dir, model_dirs
    rng = np.random.default_rng(0)
    shapes = param_shapes(cfg)
    base = {p: (rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)) for p, s in
            shapes.items()}
    save_hf(base, cfg, base_dir)
    for d in model_dirs:
        m = {}
        for p, v in base.items():
            if v.ndim >= 2:
                lead, (a, b) = v.shape[:-2], v.shape[-2:]
                u = rng.standard_normal(lead + (a, 16), dtype=np.float32)
                w = rng.standard_normal(lead + (16, b), dtype=np.float32)
                upd = (u @ w) * np.float32(2e-4)
            else:
                upd = np.zeros_like(v)
            m[p] = v + upd + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-4)
        save_hf(m, cfg, d)
        print(f"  wrote {d}", flush=True)
    (root / "done").write_text("ok\n")
    return base_dir, model_dirs


def larv_steps(base_flat, delta, *, cache=None, mode="randomized"):
    """The veneer on a finished merge; returns (params, timings, s, diagnostics, cache)."""
    import jax

    from larv_jax import diagnostics as dg
    from larv_jax.larv import plan as L

    t = {}
    t0 = time.perf_counter()
    unit_list = L.units_for(base_flat, delta)
    if cache is None:
        cache = dg.base_cache(base_flat, unit_list)
        jax.block_until_ready((cache.reff, cache.norm, [g for g in cache.gram if g is not None]))
    t["base_cache_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    diag = L.plan(base_flat, delta, gate="none", units=unit_list, cache=cache,
                  key=jax.random.PRNGKey(0), mode=mode, always_diagnose=True).diagnostics
    t["diagnose_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = L.plan(base_flat, delta, gate="tiered", units=unit_list, diagnostics=diag)
    t["gate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = L.apply(base_flat, delta, p, consume=True, inplace=True)  # as the CLI
    t["apply_s"] = time.perf_counter() - t0
    return params, t, p.s, diag, cache


def bench(method: str, base_dir: Path, model_dirs: list, repeats: int) -> dict:
    import jax
    import numpy as np

    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.merging import merge_checkpoints, merge_delta

    kw = dict(hash_inputs=False)
    merge_checkpoints(base_dir, model_dirs, method, **kw)  # warm the page cache
    merge_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merge_checkpoints(base_dir, model_dirs, method, **kw)
        merge_times.append(time.perf_counter() - t0)

    # compile run (untimed as steady state)
    t0 = time.perf_counter()
    base_flat = load_checkpoint(base_dir).flat(native=True)
    delta = merge_delta(base_dir, model_dirs, method, **kw).delta
    t_merge0 = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, _, s_rand, diag_rand, cache = larv_steps(base_flat, dict(delta))
    compile_s = time.perf_counter() - t0

    totals, cached, parts = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base_flat = load_checkpoint(base_dir).flat(native=True)
        delta = merge_delta(base_dir, model_dirs, method, **kw).delta
        t_md = time.perf_counter() - t0
        _, t, _, _, _ = larv_steps(base_flat, dict(delta))
        totals.append(t_md + sum(t.values()))
        cached.append(t_md + sum(v for k, v in t.items() if k != "base_cache_s"))
        parts.append(dict(t, merge_delta_s=t_md))

    # randomized vs exact e (not timed against the budget); the timed runs applied in place, so
    # the same delta again, freshly merged
    delta = merge_delta(base_dir, model_dirs, method, **kw).delta
    _, _, s_exact, diag_exact, _ = larv_steps(base_flat, dict(delta), cache=cache, mode="exact")
    delta = merge_delta(base_dir, model_dirs, method, **kw).delta
    _, _, s_rand, diag_rand, _ = larv_steps(base_flat, dict(delta), cache=cache)
    rel = np.abs(diag_rand.e - diag_exact.e) / np.maximum(np.abs(diag_exact.e), 1e-30)

    merge_s = statistics.median(merge_times)
    total_s = statistics.median(totals)
    cached_s = statistics.median(cached)
    med = {k: round(statistics.median(p[k] for p in parts), 4) for k in parts[0]}
    return {
        "bench": "larv_overhead", "method": method, "num_tasks": len(model_dirs),
        "merge_s": round(merge_s, 4), "merge_larv_s": round(total_s, 4),
        "merge_larv_cached_base_s": round(cached_s, 4),
        "overhead_frac": round((total_s - merge_s) / merge_s, 4),
        "overhead_frac_cached_base": round((cached_s - merge_s) / merge_s, 4),
        "parts_s": med, "compile_run_s": round(compile_s, 3),
        "first_merge_delta_s": round(t_merge0, 3), "repeats": repeats,
        "merge_times_s": [round(x, 4) for x in merge_times],
        "merge_larv_times_s": [round(x, 4) for x in totals],
        "e_randomized_vs_exact_max_rel": float(rel.max()),
        "e_randomized_vs_exact_median_rel": float(np.median(rel)),
        "tiers_changed_units": int((s_rand != s_exact).sum()),
        "num_units": int(len(s_rand)),
        "device": str(jax.devices()[0].device_kind), "num_devices": len(jax.devices()),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "host": platform.node(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ViT-B-32", help="model shape (default: ViT-B-32)")
    ap.add_argument("--tasks", type=int, default=8, help="K fine-tuned models (default: 8)")
    ap.add_argument("--methods", default="task_arithmetic,ties",
                    help="comma-separated merging registry names (default: task_arithmetic,ties)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/larv_overhead"),
                    help="where the generated checkpoints live (default: /tmp/larv_overhead)")
    ap.add_argument("--quick", action="store_true", help="tiny model, K=3, 1 repeat (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/larv_overhead.jsonl"),
                    help="JSON lines output (default: benchmarks/results/larv_overhead.jsonl)")
    args = ap.parse_args(argv)
    tasks = 3 if args.quick else args.tasks
    repeats = 1 if args.quick else args.repeats
    t0 = time.perf_counter()
    base_dir, model_dirs = make_checkpoints(args.workdir, args.preset, tasks, args.quick)
    print(f"checkpoints ready ({time.perf_counter() - t0:.1f} s): {base_dir.parent}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        row = bench(method.strip(), base_dir, model_dirs, repeats)
        row["preset"] = "quick" if args.quick else args.preset
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
