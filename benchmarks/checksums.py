"""Output checksums of a fixed set of CLI runs: a refactor must leave every one bit-identical.

    python benchmarks/checksums.py --write benchmarks/results/checksums.json   # record "before"
    python benchmarks/checksums.py --check benchmarks/results/checksums.json   # compare "after"

The runs (all on the quick offline zoo, ``--zoo DIR``; built with ``larv zoo build --quick``
when DIR holds none, used as it is otherwise, so that a before/after comparison sees the same
inputs even when the zoo recipe changes between the two commits):

- ``larv merge``: every registry method, plain and with ``--svc``; ``--larv tiered`` on every
  method; ``--larv continuous``, ``--larv linear``, ``--larv-apply pre``,
  ``--larv-granularity block``, ``--larv-set use_c=false``, and ``--svc --larv tiered`` in
  both SVC orders, on TIES (nonlinear) and Task Arithmetic;
- ``larv diagnose`` (module and block granularity, randomized and exact);
- ``larv run`` on ``configs/b32_ta8.py:quick`` (the zoo's checkpoints under the Hugging Face ids
  the config names, as symbolic links);
- ``larv demo --quick`` on the zoo.

Every output file is hashed (sha256), and so are the zoo's input checkpoints (``inputs/...``).
JSON and JSON-lines files are hashed after dropping the volatile fields (at any depth:
``timings``, ``seconds``, ``merge_seconds``, ``diag_seconds``, ``base_cache_overlapped_s``,
``versions``), replacing the run's absolute directories (zoo, work and cache directories) by
the fixed tokens ``<ZOO>``, ``<WORK>``, ``<CACHE>`` and sorting the keys (a report's field order
is not an output); ``table.md`` and ``results.md`` have the same directories replaced.
Everything else (safetensors, CSV, PNG) is hashed as it is.
Each run gets a fresh ``LARV_JAX_CACHE_DIR`` under the work directory, so the LARV base cache is
computed (and then read back) the same way on every invocation. In one process; a few minutes on
the 2-core VM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

VOLATILE = frozenset({"timings", "seconds", "merge_seconds", "diag_seconds",
                      "base_cache_overlapped_s", "versions"})
# the registry's names as of the recorded checksums (a new method adds runs, not differences)
METHODS = ["simple_average", "task_arithmetic", "ties", "ties_paper", "dare_task_arithmetic",
           "dare_ties", "dare_average", "tsv_m", "iso_c", "iso_cts"]
REPO = Path(__file__).resolve().parent.parent


def merge_runs() -> dict[str, list[str]]:
    """Run name -> extra ``larv merge`` flags."""
    runs: dict[str, list[str]] = {}
    for m in METHODS:
        runs[f"merge_{m}"] = ["--method", m]
        runs[f"merge_{m}_svc"] = ["--method", m, "--svc"]
        runs[f"merge_{m}_larv_tiered"] = ["--method", m, "--larv", "tiered"]
    for m in ("ties", "task_arithmetic"):
        runs[f"merge_{m}_larv_continuous"] = ["--method", m, "--larv", "continuous"]
        runs[f"merge_{m}_larv_linear"] = ["--method", m, "--larv", "linear"]
        runs[f"merge_{m}_larv_pre"] = ["--method", m, "--larv", "tiered", "--larv-apply", "pre"]
        runs[f"merge_{m}_larv_block"] = ["--method", m, "--larv", "tiered",
                                         "--larv-granularity", "block"]
        runs[f"merge_{m}_larv_no_c"] = ["--method", m, "--larv", "tiered", "--larv-set",
                                        "use_c=false", "--larv-mode", "exact"]
        runs[f"merge_{m}_svc_larv"] = ["--method", m, "--svc", "--larv", "tiered"]
        runs[f"merge_{m}_svc_larv_first"] = ["--method", m, "--svc", "--larv", "tiered",
                                             "--larv-svc-order", "larv_first"]
    runs["merge_ties_svc_larv_pre"] = ["--method", "ties", "--svc", "--larv", "continuous",
                                       "--larv-apply", "pre"]
    runs["merge_dare_ties_seed_larv"] = ["--method", "dare_ties", "--seed", "3", "--larv",
                                         "tiered(alpha=0.25)"]
    return runs


def diagnose_runs() -> dict[str, list[str]]:
    return {
        "diagnose_ta": [],
        "diagnose_ties_block": ["--method", "ties", "--granularity", "block"],
        "diagnose_tsv_m_exact": ["--method", "tsv_m", "--mode", "exact"],
    }


def _normalize(obj, roots):
    if isinstance(obj, dict):
        return {k: _normalize(v, roots) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normalize(v, roots) for v in obj]
    if isinstance(obj, str):
        return _replace(obj, roots)
    return obj


def _replace(text: str, roots: dict[str, str]) -> str:
    for token, root in roots.items():  # longest first: the work dir holds the cache dir
        text = text.replace(root, token)
    return text


def file_digest(path: Path, roots: dict[str, str]) -> str:
    """sha256 of one output file, JSON normalized (see the module docstring)."""
    if path.suffix == ".json":
        data = json.dumps(_normalize(json.loads(path.read_text()), roots), sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()
    if path.suffix == ".jsonl":
        lines = [json.dumps(_normalize(json.loads(line), roots), sort_keys=True)
                 for line in path.read_text().splitlines() if line.strip()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    if path.suffix == ".md":
        return hashlib.sha256(_replace(path.read_text(), roots).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def digests(out: Path, name: str, roots: dict[str, str]) -> dict[str, str]:
    return {f"{name}/{p.relative_to(out).as_posix()}": file_digest(p, roots)
            for p in sorted(out.rglob("*")) if p.is_file()}


def run_all(zoo_dir: Path, work: Path, only: str | None = None) -> dict[str, str]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cache = work / "cache"
    os.environ["LARV_JAX_CACHE_DIR"] = str(cache)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from larv_jax.cli import main

    if not (zoo_dir / "manifest.json").exists():
        assert main(["zoo", "build", "--quick", "--out", str(zoo_dir), "--no-progress"]) == 0
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    tasks = list(manifest["spec"]["tasks"])
    base = zoo_dir / "pretrained"
    models = [zoo_dir / "finetuned" / t for t in tasks]
    roots = dict(sorted({"<CACHE>": str(cache), "<WORK>": str(work),
                         "<ZOO>": str(zoo_dir)}.items(), key=lambda kv: -len(kv[1])))
    # the inputs themselves: a before/after comparison is only meaningful on the same zoo
    out: dict[str, str] = {f"inputs/{p.relative_to(zoo_dir).as_posix()}": file_digest(p, roots)
                           for p in [base, *models] for p in [p / "model.safetensors"]}

    def run(name: str, argv: list[str], target: Path) -> None:
        if only is not None and not name.startswith(only):
            return
        t0 = time.perf_counter()
        rc = main(argv)
        if rc != 0:
            raise SystemExit(f"{name}: exit status {rc}: larv {' '.join(argv)}")
        out.update(digests(target, name, roots))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    inputs = ["--base", str(base), "--models", *map(str, models)]
    for name, flags in merge_runs().items():
        target = work / name
        run(name, ["merge", *inputs, *flags, "--out", str(target)], target)
    for name, flags in diagnose_runs().items():
        target = work / name
        run(name, ["diagnose", *inputs, *flags, "--out", str(target)], target)

    # larv run: the quick b32_ta8 grid on the zoo's checkpoints, under the ids it names
    ckpt = work / "checkpoints"
    (ckpt / "openai").mkdir(parents=True)
    (ckpt / "openai" / "clip-vit-base-patch32").symlink_to(base)
    (ckpt / "tanganke").mkdir()
    for task, m in zip(("sun397", "stanford-cars"), models, strict=False):
        (ckpt / "tanganke" / f"clip-vit-base-patch32_{task}").symlink_to(m)
    target = work / "run_b32_ta8_quick"
    run("run_b32_ta8_quick", ["run", "--config",
                              f"{REPO}/configs/b32_ta8.py:quick,checkpoint_dir={ckpt}",
                              "--out-dir", str(target), "--set", "save_params=True"], target)

    target = work / "demo_quick"
    run("demo_quick", ["demo", "--quick", "--zoo", str(zoo_dir), "--out", str(target),
                       "--no-progress"], target)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("/tmp/wt15-zoo"),
                    help="quick zoo directory, built there if absent (default: /tmp/wt15-zoo)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/larv-checksums"),
                    help="scratch directory for the outputs, emptied first "
                         "(default: /tmp/larv-checksums)")
    ap.add_argument("--write", type=Path, default=None, help="write the checksums (JSON) here")
    ap.add_argument("--check", type=Path, default=None,
                    help="compare against this file; exit 1 on any difference")
    ap.add_argument("--only", default=None, help="only runs whose name starts with this")
    args = ap.parse_args()
    t0 = time.perf_counter()
    got = run_all(args.zoo.resolve(), args.work.resolve(), args.only)
    print(f"{len(got)} files hashed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if args.check is not None:
        want = json.loads(args.check.read_text())
        if args.only is not None:
            want = {k: v for k, v in want.items() if k.startswith(args.only)}
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        for k in bad:
            print(f"DIFFERS {k}: want {want.get(k)} got {got.get(k)}")
        print(f"{len(want) - len(bad)}/{len(want)} identical" if not bad else
              f"{len(bad)} of {len(set(want) | set(got))} files differ")
        return 1 if bad else 0
    if args.write is None:
        for k, v in sorted(got.items()):
            print(v, k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
