"""Benchmark of the LARV diagnostics engine on ViT-B/32- and ViT-L/14-shaped vision towers.

    python benchmarks/diagnostics.py            # B/32 and L/14, JSON lines to
                                                # benchmarks/results/diagnostics.jsonl
    python benchmarks/diagnostics.py --quick    # B/32 only, fewer reference matrices

Weights are generated here: theta0 Gaussian (entries N(0, 1/n)), the merged update low-rank plus
noise (rank 16, noise ~10 % of the energy). Per configuration and mode (``randomized``: randomized
e + exact c, the default; ``exact``: exact e + exact c) it reports compile and steady-state time
(``block_until_ready`` / host results), units per second, achieved GFLOP/s from an analytic flop
count of the algorithm, the GFLOP/s of a large matmul measured in the same run (the roofline) and
the ratio steady / roofline time, and speed-ups over (a) a straightforward numpy implementation
(full SVD for r_eff, explicit commutator products A D^T - D A^T) and (b) a torch CPU
implementation of the same algorithm as the engine (Gram commutators, randomized SVD by QR,
batched), both timed in the same run on a subset of each bucket's matrices and scaled by count
(``ref_matrices``). The per-base cache (exact r_eff(theta0), Grams) is timed separately, it is
computed once per pretrained model. Accuracy: the largest relative gap between randomized and
exact per-unit e and how many units change tier (33 % / 67 % quantiles of e).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from larv_jax import diagnostics as dg
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import get_preset
from larv_jax.tree import flatten, to_matrix

K_, P_, Q_ = 64, 10, 2


def make_weights(preset: str, seed: int = 0, rank: int = 16, noise: float = 0.1):
    """Matrix leaves of theta0 and D (noise = fraction of D's energy)."""
    cfg = get_preset(preset).vision_only()
    shapes = {p: v.shape for p, v in flatten(abstract_params(cfg)).items()}
    us = dg.units(shapes)
    mats = sorted({p for u in us for p, _ in u.matrices})
    rng = np.random.default_rng(seed)
    base, delta = {}, {}
    for p in mats:
        s = shapes[p]
        base[p] = rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[-2]))
        # Low rank over the Flax layout's last two axes (for the patch conv that is not low rank
        # in its [D, 3 P P] matrix view; it is one matrix of 73 / 145).
        u = rng.standard_normal((*s[:-1], rank), dtype=np.float32)
        v = rng.standard_normal((*s[:-2], rank, s[-1]), dtype=np.float32)
        low = np.matmul(u, v) / np.float32(np.sqrt(rank))
        amp = np.float32(np.sqrt(noise / (1 - noise)))
        delta[p] = np.float32(0.01) * (low + amp * rng.standard_normal(s, dtype=np.float32))
    return cfg, shapes, us, base, delta


def flops(plan, mode: str) -> float:
    """Analytic flop count of the engine's algorithm (per diagnose call, base cache excluded).

    One shifted Cholesky-QR pass on ``rows x k'`` costs ``4 rows k'^2 + k'^3`` (Gram, Cholesky,
    triangular inverse, product); the range finder does ``q`` (matrix: ``2q``) one-pass
    re-orthonormalisations and a three-pass orthonormalisation at the end.
    """
    total = 0.0
    for b in plan:
        m, n = b.shape
        kk = min(K_ + P_, n)
        passes = lambda rows, count, kk=kk: count * (4 * rows * kk * kk + kk**3)  # noqa: E731
        if b.square:
            f = 4 * n**3                                    # A D and D A
            if mode == "exact":
                f += 2 * n**3 + 4 / 3 * n**3                # G_D, sytrd
            else:
                f += (2 + 4 * Q_ + 2) * n * n * kk + 2 * kk * kk * n  # range finder, Q^T A, B B^T
                f += passes(n, 2 * Q_ + 3)
        else:
            f = 4 * m * n * n                               # G_D = D^T D and Y = A^T D
            if mode == "exact":
                f += 4 / 3 * n**3
            else:
                f += (1 + Q_ + 1) * 2 * n * n * kk + 2 * n * kk * kk + passes(n, Q_ + 3)
        total += f * len(b.members)
    return total


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _pairs(plan, base, delta, per_bucket: int):
    """Up to ``per_bucket`` (A, D) torch-layout pairs of each bucket, with the bucket's count."""
    out = []
    for b in plan:
        refs = b.members[:per_bucket]
        pairs = []
        for r in refs:
            a = to_matrix(r.path, base[r.path])
            d = to_matrix(r.path, delta[r.path])
            a, d = (a, d) if r.block is None else (a[r.block], d[r.block])
            pairs.append((np.ascontiguousarray(a), np.ascontiguousarray(d)))
        out.append((pairs, len(b.members)))
    return out


def numpy_reference(pairs, mode: str, rng) -> float:
    """Straightforward numpy: full SVD (exact) or QR range finder (randomized) for r_eff,
    explicit commutator products. Returns seconds scaled to the full matrix count."""
    total = 0.0
    for plist, count in pairs:
        t = time.perf_counter()
        for a, d in plist:
            s_a = np.linalg.svd(a, compute_uv=False)
            if mode == "exact":
                s_d = np.linalg.svd(d, compute_uv=False)
            else:
                om = rng.standard_normal((d.shape[1], K_ + P_)).astype(np.float32)
                qm, _ = np.linalg.qr(d @ om)
                for _ in range(Q_):
                    z, _ = np.linalg.qr(d.T @ qm)
                    qm, _ = np.linalg.qr(d @ z)
                s_d = np.linalg.svd(qm.T @ d, compute_uv=False)
            for s in (s_a, s_d):
                p = s**2 / np.sum(s**2)
                _ = -np.sum(p * np.log(np.where(p > 0, p, 1)))
            if a.shape[0] == a.shape[1]:
                _ = np.linalg.norm(a @ d - d @ a)
            else:
                _ = np.linalg.norm(a @ d.T - d @ a.T) + np.linalg.norm(a.T @ d - d.T @ a)
        total += (time.perf_counter() - t) * count / len(plist)
    return total


def torch_reference(pairs, mode: str) -> float:
    """torch CPU, the engine's algorithm batched per bucket (Gram commutators, QR range finder,
    eigvalsh of Grams for exact). Returns seconds scaled to the full matrix count."""
    import torch

    torch.manual_seed(0)
    total = 0.0
    for plist, count in pairs:
        tall = [(a, d) if a.shape[0] >= a.shape[1] else (a.T.copy(), d.T.copy()) for a, d in plist]
        a = torch.from_numpy(np.stack([x for x, _ in tall]))
        d = torch.from_numpy(np.stack([y for _, y in tall]))
        t = time.perf_counter()
        with torch.no_grad():
            g_a = a.mT @ a
            _ = torch.linalg.eigvalsh(g_a)  # exact r_eff(theta0): per-base, counted like numpy
            if a.shape[1] == a.shape[2]:
                _ = torch.linalg.matrix_norm(a @ d - d @ a)
                g_d = d.mT @ d if mode == "exact" else None
            else:
                g_d = d.mT @ d
                y = a.mT @ d
                tr = (y * y.mT).sum((1, 2))
                _ = (2 * (g_a * g_d).sum((1, 2)) - 2 * tr).clamp_min(0).sqrt()
            if mode == "exact":
                _ = torch.linalg.eigvalsh(g_d)
            else:
                om = torch.randn(d.shape[0], d.shape[2], K_ + P_)
                qm = torch.linalg.qr(d @ om).Q
                for _ in range(Q_):
                    z = torch.linalg.qr(d.mT @ qm).Q
                    qm = torch.linalg.qr(d @ z).Q
                _ = torch.linalg.svdvals(qm.mT @ d)
        total += (time.perf_counter() - t) * count / len(plist)
    return total


def tiers(e: np.ndarray) -> np.ndarray:
    t1, t2 = np.quantile(e, [1 / 3, 2 / 3])
    return np.digitize(e, [t1, t2], right=True)


def run_config(preset: str, *, steady_reps: int, ref_per_bucket: int, roofline: float,
               out: list[dict]) -> None:
    t0 = time.perf_counter()
    cfg, shapes, us, base, delta = make_weights(preset)
    t_gen = time.perf_counter() - t0
    plan = dg.plan_buckets(us, shapes)
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    cache = dg.base_cache(base, us)
    t_cache_first = time.perf_counter() - t
    t = time.perf_counter()
    cache = dg.base_cache(base, us)
    t_cache = time.perf_counter() - t
    pairs = _pairs(plan, base, delta, ref_per_bucket)
    results = {}
    for mode in ("randomized", "exact"):
        t = time.perf_counter()
        diag = dg.diagnose(base, delta, units=us, key=key, mode=mode, cache=cache)
        first = time.perf_counter() - t
        times = []
        for _ in range(steady_reps):
            t = time.perf_counter()
            diag = dg.diagnose(base, delta, units=us, key=key, mode=mode, cache=cache)
            times.append(time.perf_counter() - t)
        steady = float(np.median(times))
        results[mode] = diag
        f = flops(plan, mode)
        t_np = numpy_reference(pairs, mode, np.random.default_rng(0))
        t_torch = torch_reference(pairs, mode)
        rec = {
            "bench": "diagnostics", "config": preset, "mode": mode,
            "e": "randomized" if mode == "randomized" else "exact", "c": "exact",
            "units": len(us), "matrices": sum(len(b.members) for b in plan),
            "buckets": [[len(b.members), *b.shape] for b in plan],
            "compile_s": first - steady, "first_call_s": first, "steady_s": steady,
            "steady_all_s": times, "units_per_s": len(us) / steady,
            "gflop": f / 1e9, "gflops_achieved": f / steady / 1e9,
            "roofline_matmul_gflops": roofline, "roofline_time_s": f / (roofline * 1e9),
            "steady_over_roofline": steady / (f / (roofline * 1e9)),
            "numpy_s": t_np, "speedup_vs_numpy": t_np / steady,
            "torch_s": t_torch, "speedup_vs_torch": t_torch / steady,
            "ref_matrices_per_bucket": ref_per_bucket,
            "base_cache_first_s": t_cache_first, "base_cache_s": t_cache,
            "weights_gen_s": t_gen,
            "device": f"{jax.devices()[0].platform}:{jax.device_count()} "
                      f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "jax": jax.__version__,
        }
        out.append(rec)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in rec.items() if k != "steady_all_s"}), flush=True)
    e_r, e_x = results["randomized"].e, results["exact"].e
    acc = {"bench": "diagnostics", "config": preset, "accuracy": True,
           "e_rel_gap_max": float(np.max(np.abs(e_r / e_x - 1))),
           "e_rel_gap_mean": float(np.mean(np.abs(e_r / e_x - 1))),
           "tier_changes": int(np.sum(tiers(e_r) != tiers(e_x))), "units": len(us),
           "c_max_abs_diff": float(np.max(np.abs(results["randomized"].c
                                                 - results["exact"].c)))}
    out.append(acc)
    print(json.dumps(acc), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B/32 only, 1 steady rep, 2 ref matrices")
    ap.add_argument("--configs", nargs="*", default=None, help="presets (default B/32, L/14)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/diagnostics.jsonl"))
    args = ap.parse_args(argv)
    configs = args.configs or (["ViT-B-32"] if args.quick else ["ViT-B-32", "ViT-L-14"])
    roofline = matmul_gflops()
    print(f"roofline: {roofline:.1f} GFLOP/s (jit 2048^3 float32 matmul)", flush=True)
    out: list[dict] = []
    for preset in configs:
        # the numpy reference (full SVDs) is slow on L/14: 2 matrices per bucket there
        run_config(preset, steady_reps=1 if args.quick else 3,
                   ref_per_bucket=2 if args.quick or "L" in preset else 4, roofline=roofline,
                   out=out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for rec in out:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
