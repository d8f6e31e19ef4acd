"""End-to-end merge benchmark: load K checkpoints, merge, save (``larv merge``), per method.

    python benchmarks/merge.py            # ViT-B/32 vision tower, K = 8, every method (+ SVC)
    python benchmarks/merge.py --quick    # 2 blocks, K = 3, three methods
    python benchmarks/merge.py --preset ViT-L-14 --tasks 20 --no-svc   # the memory check
    python benchmarks/merge.py --larv --no-svc --methods task_arithmetic ties   # LARV overhead

Checkpoints are random ``CLIPVisionModel``-shaped safetensors written once with ``save_hf`` into
``--workdir`` (base ~ N(0, 0.02), task vectors ~ N(0, 1e-3)). Each method runs the real CLI entry
point in its own subprocess; wall time and that child's peak RSS (``os.wait4`` rusage) are
recorded. References: a same-run "read only" child that reads every byte of the K + 1 inputs
once into a 256 KiB buffer (the I/O floor), and FusionBench 0.2.33 on this machine (fixed
figures, quoted below). ``--larv`` also runs every method with ``--larv tiered`` right after
its plain run and records LARV's end-to-end overhead against it (``larv_overhead_frac``, process
wall times: jax import, base cache, diagnostics, gate and the scaled apply included), and
whether the LARV per-base cache was computed or read from its on-disk copy
(``larv_base_cache``; the first LARV run on a fresh ``LARV_JAX_CACHE_DIR`` computes it).
JSON lines go to ``--out`` (default ``benchmarks/results/merge.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# FusionBench 0.2.33, ViT-B/32, K = 8, on this 2-core machine (seconds; peak RSS 2.1-6.6 GB, TIES
# 20.7 GB; SVC adds 40-55 s).
FUSIONBENCH_S = {"task_arithmetic": 16.0, "iso_c": 24.0, "ties": 119.0, "tsv_m": 152.0,
                 "iso_cts": 169.0}
FUSIONBENCH_SVC_EXTRA_S = (40.0, 55.0)
FUSIONBENCH_RSS_GB = {"ties": 20.7}

SVC_FOR = ["task_arithmetic", "tsv_m", "iso_c", "iso_cts"]


def make_zoo(workdir: Path, k: int, layers: int, preset: str = "ViT-B-32"
             ) -> tuple[Path, list[Path]]:
    import numpy as np

    from larv_jax.checkpoint import save_hf
    from larv_jax.models.config import CLIPConfig, get_preset, param_shapes

    v = get_preset(preset).vision
    if layers != v.layers:
        import dataclasses

        v = dataclasses.replace(v, layers=layers)
    cfg = CLIPConfig(vision=v, name=preset)
    shapes = param_shapes(cfg)
    base_dir = workdir / "base"
    rng = np.random.default_rng(0)
    if not (base_dir / "model.safetensors").exists():
        save_hf({p: (0.02 * rng.standard_normal(s, dtype=np.float32)) for p, s in shapes.items()},
                cfg, base_dir)
    from larv_jax.checkpoint import load_checkpoint

    base = None
    dirs = []
    for i in range(k):
        d = workdir / f"task{i}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue
        base = base or load_checkpoint(base_dir).flat()
        r = np.random.default_rng(1 + i)
        save_hf({p: base[p] + 1e-3 * r.standard_normal(base[p].shape, dtype=np.float32)
                 for p in shapes}, cfg, d)
    return base_dir, dirs


def child(args) -> None:
    """One measured run inside a fresh process; prints a JSON line."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    if args.child == "read_only":
        # the I/O floor: every byte of the K + 1 safetensors files into one cache-sized buffer
        buf = bytearray(1 << 18)
        for d in [args.base, *args.models]:
            with open(d / "model.safetensors", "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        print(json.dumps({"wall_s": time.perf_counter() - t0, "vmhwm_gb": _vmhwm_gb()}))
        return
    from larv_jax.cli import main

    argv = ["merge", "--base", str(args.base), "--models", *map(str, args.models), "--method",
            args.child, "--out", str(args.workdir / f"out_{args.child}"), "--overwrite",
            "--no-hash"]
    if args.svc:
        argv.append("--svc")
    if args.larv:
        argv += ["--larv", "tiered"]
    rc = main(argv)
    wall = time.perf_counter() - t0
    report = json.loads((args.workdir / f"out_{args.child}" / "merge_report.json").read_text())
    source = (report.get("larv") or {}).get("base_cache_source")
    print(json.dumps({"rc": rc, "wall_s": wall, "timings": report["timings"],
                      "vmhwm_gb": _vmhwm_gb(),
                      "larv_base_cache": None if source is None else
                      "computed" if source == "computed" else "disk"}))


def _vmhwm_gb() -> float | None:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss``, which Linux carries over
    ``fork`` + ``exec`` from the parent (a driver that has just generated a ViT-L/14 zoo would
    lend every child its own 3.5 GB), it belongs to this process's own address space."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20       # kB -> GiB
    except OSError:
        pass
    return None


def measure_rss(method: str, svc: bool, base: Path, models: list[Path], workdir: Path,
                larv: bool = False) -> dict:
    """Run one method in a fresh child process: its wall time, timings and peak RSS (the
    child's ``VmHWM``; ``os.wait4``'s ``ru_maxrss`` where /proc is missing)."""
    cmd = [sys.executable, __file__, "--child", method, "--base", str(base), "--workdir",
           str(workdir), "--models", *map(str, models)] + (["--svc"] if svc else []) + (
               ["--larv"] if larv else [])
    t0 = time.perf_counter()
    with open(workdir / "child.out", "w") as fo, open(workdir / "child.err", "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{method} failed:\n{(workdir / 'child.err').read_text()[-3000:]}")
    rec = json.loads((workdir / "child.out").read_text().strip().splitlines()[-1])
    rec["process_wall_s"] = wall            # includes interpreter + jax import
    # the child's own high-water mark where /proc has it, else rusage (an upper bound)
    rec["peak_rss_gb"] = rec.get("vmhwm_gb") or usage.ru_maxrss / 2**20   # KiB -> GiB
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks, K = 3, three methods")
    ap.add_argument("--tasks", type=int, default=None, help="K (default 8; 3 with --quick)")
    ap.add_argument("--preset", default="ViT-B-32", choices=["ViT-B-32", "ViT-B-16", "ViT-L-14"],
                    help="vision tower shapes (default ViT-B-32; FusionBench figures are B/32)")
    ap.add_argument("--methods", nargs="*", default=None, help="default: all (+ SVC variants)")
    ap.add_argument("--no-svc", action="store_true", help="skip the SVC variants")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/larv_merge_bench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/merge.jsonl"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--svc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--larv", action="store_true",
                    help="also run each method with --larv tiered (LARV's overhead)")
    ap.add_argument("--base", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    k = args.tasks or (3 if args.quick else 8)
    from larv_jax.models.config import get_preset

    full = get_preset(args.preset).vision.layers
    layers = 2 if args.quick else full
    tag = {"ViT-B-32": "b32", "ViT-B-16": "b16", "ViT-L-14": "l14"}[args.preset]
    workdir = args.workdir / f"{tag}_L{layers}_K{k}"
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, models = make_zoo(workdir, k, layers, args.preset)
    print(f"zoo ready in {time.perf_counter() - t0:.1f}s: {workdir}", flush=True)
    from larv_jax.merging.registry import METHODS

    methods = args.methods or (["task_arithmetic", "ties", "iso_c"] if args.quick else list(METHODS))
    plain = [(m, False) for m in methods]
    if not args.no_svc:
        plain += [(m, True) for m in methods if m in SVC_FOR]
    runs = [("read_only", False, False)]   # (method, svc, larv)
    for method, svc in plain:
        runs.append((method, svc, False))
        if args.larv:                      # right after its plain run
            runs.append((method, svc, True))
    plain_s: dict[tuple[str, bool], float] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import scipy

    for method, svc, larv in runs:
        rec = measure_rss(method, svc, base, models, workdir, larv)
        reference = args.preset == "ViT-B-32" and layers == full and k == 8
        ref = FUSIONBENCH_S.get(method) if not svc and reference and not larv else None
        row = {
            "bench": "merge",
            "model": args.preset if layers == full else f"{args.preset}-L{layers}",
            "K": k, "method": method, "svc": svc, "larv": "tiered" if larv else None,
            "larv_base_cache": rec.get("larv_base_cache"),
            "wall_s": round(rec["wall_s"], 2),
            "process_wall_s": round(rec["process_wall_s"], 2),
            "peak_rss_gb": round(rec["peak_rss_gb"], 3),
            "timings": {a: (round(b, 2) if isinstance(b, float) else b)
                        for a, b in rec.get("timings", {}).items()},
            "fusionbench_s": ref,
            "speedup_vs_fusionbench": round(ref / rec["process_wall_s"], 2) if ref else None,
            "device": f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})",
            "numpy": np.__version__, "scipy": scipy.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if larv and (method, svc) in plain_s:
            plain = plain_s[(method, svc)]
            row["larv_overhead_frac"] = round((rec["process_wall_s"] - plain) / plain, 4)
        elif not larv:
            plain_s[(method, svc)] = rec["process_wall_s"]
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
