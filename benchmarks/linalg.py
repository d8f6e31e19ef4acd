"""The spectral kernels' two routes (``larv_jax/merging/linalg.py``, docs/SPEC.md §4): speed and
accuracy of each merger's matrix kernel with the routing rule (Gram route only while every needed
singular value is >= sigma_1 / GRAM_MAX_COND, LAPACK otherwise) against the Gram route everywhere
(``GRAM_MAX_COND = inf``: the route every matrix took before issue 16), in the same run.

    python benchmarks/linalg.py            # one ViT-B/32 block (q, k, v, o, fc1, fc2), K = 8
    python benchmarks/linalg.py --quick    # 256-wide matrices, K = 4

Two input families: ``gauss`` (task vectors ~ N(0, 1e-3), the distribution of
``benchmarks/merge.py``'s checkpoints) and ``lora`` (each task a rank-4..16 product plus noise of
1e-5 of its norm: condition numbers far beyond 1e4, where the Gram route drops directions).
Times are process CPU seconds with single-threaded BLAS, the minimum of ``--repeats`` alternating
runs (robust to other load on the machine); errors are the largest entry of the difference with
scipy's float64 ``gesvd`` reference, relative to the reference's largest entry. JSON lines to
``--out`` (default ``benchmarks/results/linalg.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import scipy.linalg

from larv_jax.merging import linalg


def tasks(kind: str, k: int, m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return (1e-3 * rng.standard_normal((k, m, n))).astype(np.float32)
    out = []
    for _ in range(k):
        r = int(rng.integers(4, 17))
        sig = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * 1e-3
        e = rng.standard_normal((m, n))
        out.append(sig + 1e-5 * np.linalg.norm(sig) / np.linalg.norm(e) * e)
    return np.stack(out).astype(np.float32)


def _svd(a):
    return scipy.linalg.svd(np.asarray(a, np.float64), full_matrices=False, lapack_driver="gesvd")


def _polar(a):
    u, _, vt = _svd(a)
    return u @ vt


def ref(method: str, taus: np.ndarray) -> np.ndarray:
    """The mergers of SPEC §4 written on scipy's gesvd (the independent reference)."""
    taus = taus.astype(np.float64)
    num, m, n = taus.shape
    r = min(m, n)
    if method == "iso_c":
        u, s, vt = _svd(taus.sum(0))
        return s.mean() * u @ vt
    if method == "tsv_m":
        k = r // num
        trip = [_svd(t) for t in taus]
        ub = np.hstack([u[:, :k] for u, _, _ in trip])
        vb = np.hstack([vt[:k].T for _, _, vt in trip])
        sb = np.concatenate([s[:k] for _, s, _ in trip])
        return (_polar(ub) * sb) @ _polar(vb).T
    c = r - round((r - math.floor(r * 0.8)) / num) * num
    d = (r - c) // num
    u, s, vt = _svd(taus.sum(0))
    uc, sc, vc = u[:, :c], s[:c], vt[:c].T
    us, ss, vs = [], [], []
    for t in taus:
        u2, s2, vt2 = _svd(t - uc @ (uc.T @ t))
        us.append(u2[:, :d]), ss.append(s2[:d]), vs.append(vt2[:d].T)
    return np.concatenate([*ss, sc]).mean() * _polar(np.hstack([*us, uc])) @ _polar(
        np.hstack([*vs, vc])).T


KERNELS = {"tsv_m": linalg.tsv_m_matrix, "iso_c": linalg.iso_c_matrix,
           "iso_cts": lambda t: linalg.iso_cts_matrix(t, 0.8)}


def main() -> None:
    from larv_jax.merging.methods import _single_threaded_blas

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/linalg.jsonl"))
    args = ap.parse_args()
    k, shapes = ((4, [(256, 256), (512, 256)]) if args.quick
                 else (8, [(768, 768)] * 4 + [(3072, 768), (768, 3072)]))
    routing = linalg.GRAM_MAX_COND
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("gauss", "lora"):
        rng = np.random.default_rng(0)
        data = [tasks(kind, k, m, n, rng) for m, n in shapes]
        for name, fn in KERNELS.items():
            want = [ref(name, t) for t in data]
            rec = {}
            with _single_threaded_blas():
                for _ in range(args.repeats):
                    for label, cond in (("gram_everywhere", math.inf), ("routed", routing)):
                        linalg.GRAM_MAX_COND = cond
                        try:
                            t0 = time.process_time()
                            got = [fn(t) for t in data]
                            dt = time.process_time() - t0
                        finally:
                            linalg.GRAM_MAX_COND = routing
                        r = rec.setdefault(label, {"cpu_s": math.inf})
                        r["cpu_s"] = min(r["cpu_s"], dt)
                        r["max_rel_err"] = max(float(np.abs(g - w).max() / np.abs(w).max())
                                               for g, w in zip(got, want, strict=True))
            line = {"bench": "linalg", "inputs": kind, "method": name, "K": k,
                    "shapes": [list(s) for s in shapes], "repeats": args.repeats,
                    "routed_cpu_s": round(rec["routed"]["cpu_s"], 3),
                    "gram_everywhere_cpu_s": round(rec["gram_everywhere"]["cpu_s"], 3),
                    "routed_vs_gram": round(rec["routed"]["cpu_s"]
                                            / rec["gram_everywhere"]["cpu_s"], 3),
                    "routed_max_rel_err": rec["routed"]["max_rel_err"],
                    "gram_everywhere_max_rel_err": rec["gram_everywhere"]["max_rel_err"],
                    "device": f"cpu x{__import__('os').cpu_count()} ({platform.machine()})",
                    "numpy": np.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(json.dumps(line), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
