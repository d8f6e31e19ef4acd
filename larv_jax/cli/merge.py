"""``larv merge --base B --models M1 M2 ... --method NAME --out DIR``: data-free merging.

Streams the checkpoints leaf by leaf (larv_jax.merging.merge_delta), applies theta0 + D, and
writes a Hugging Face directory (model.safetensors + config.json, the base's architecture) plus
merge_report.json, atomically.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

METHOD_NAMES = ["simple_average", "task_arithmetic", "ties", "ties_paper", "dare_task_arithmetic",
                "dare_ties", "dare_average", "tsv_m", "iso_c", "iso_cts"]


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned checkpoints (optionally with LARV)",
                       description=__doc__)
    p.add_argument("--base", required=True, type=Path,
                   help="pretrained checkpoint theta0 (HF dir / .safetensors / OpenAI .pt)")
    p.add_argument("--models", required=True, nargs="+", type=Path,
                   help="fine-tuned checkpoints theta_1..theta_K (same keys and shapes)")
    p.add_argument("--method", required=True, choices=METHOD_NAMES,
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
    from larv_jax.larv import flags as larv_flags

    larv_flags.add_arguments(p)


def parse_sets(items: list[str]) -> dict:
    """``["keep=0.1", "exclude=['proj']"]`` -> ``{"keep": 0.1, "exclude": ["proj"]}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE; got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from larv_jax.checkpoint import load_checkpoint, save_hf
    from larv_jax.larv import flags as larv_flags
    from larv_jax.merging import apply_delta, merge_delta

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists (pass --overwrite to replace it)")
    hparams = parse_sets(args.set)
    if args.scale is not None:
        hparams["scale"] = args.scale
    if args.seed is not None:
        hparams["key"] = args.seed
    base = load_checkpoint(args.base)
    models = [load_checkpoint(m) for m in args.models]
    # the LARV base cache depends on theta0 alone: computed while the merge streams the models
    prefetched = larv_flags.start_base_cache(args, args.base, models)
    delta, report = merge_delta(base, models, args.method,
                                svc=args.svc and larv_flags.svc_before_larv(args),
                                svc_alpha=args.svc_alpha, hash_inputs=not args.no_hash, **hparams)
    # LARV veneer (--larv ...): per-leaf scales s from (base, delta); theta = theta0 + s * D.
    t0 = time.perf_counter()
    delta, scales, report["larv"] = larv_flags.finish(args, base, delta, models=models,
                                                      method=args.method, hparams=hparams,
                                                      prefetched=prefetched)
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
