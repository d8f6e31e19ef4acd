"""``larv eval``: zero-shot top-1 of a (merged) vision tower on the task suites.

    larv eval --model merged/ --clip openai-clip-vit-b32/ --tasks TA8 --data-dir ~/tensorflow_datasets \\
        [--corruptions all --severity 3] [--finetuned ft/sun397 ft/stanford_cars ...] --out results/

Writes ``<out>/eval.json`` and ``<out>/eval.md`` (atomically): top-1 per task, the suite average,
normalized accuracy (merged / fine-tuned) when fine-tuned models are given, and one column per
corruption when asked. ``--clip`` is the pretrained CLIPModel directory (text tower, tokenizer,
visual projection); ``--model`` defaults to it (the zero-shot baseline).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments

    p = sub.add_parser("eval", help="zero-shot evaluation on the TFDS task suites",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="vision model to evaluate (HF dir, .safetensors, .pt); default: --clip")
    p.add_argument("--clip", type=Path, required=True,
                   help="pretrained CLIPModel dir (config.json, weights, tokenizer.json)")
    p.add_argument("--tasks", default="TA8",
                   help="TA8 | TALL14 | TALL20 | UNSEEN | comma-separated task names")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's own)")
    p.add_argument("--corruptions", default=None,
                   help="'all' or comma-separated names (motion_blur, impulse_noise, "
                        "gaussian_noise, pixelate, spatter, contrast, jpeg_compression)")
    p.add_argument("--severity", type=int, default=3, choices=range(1, 6), metavar="1-5")
    p.add_argument("--corruption-table", default="cifar", choices=("cifar", "imagenet"))
    p.add_argument("--finetuned", nargs="+", default=None, metavar="[TASK=]DIR",
                   help="fine-tuned models for normalized accuracy: TASK=DIR pairs, or DIRs in "
                        "--tasks order")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="first N test examples per task")
    p.add_argument("--seed", type=int, default=0, help="corruption seed")
    p.add_argument("--threads", type=int, default=4, help="grain reader threads")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="operand dtype of the image tower's matrix products (bfloat16: float32 "
                        "accumulation, everything else float32; ~3x faster on CPUs with AMX)")
    p.add_argument("--heads-cache", type=Path, default=None,
                   help="zero-shot head cache dir (default: <out>/heads)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow whole-module torch pickles (executes code; trusted files only)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)


def _finetuned_map(entries: list[str] | None, tasks: tuple[str, ...]) -> dict[str, Path]:
    if not entries:
        return {}
    if all("=" in e for e in entries):
        pairs = dict(e.split("=", 1) for e in entries)
        unknown = sorted(set(pairs) - set(tasks))
        if unknown:
            raise ValueError(f"--finetuned names tasks not in --tasks: {unknown}")
        return {t: Path(d) for t, d in pairs.items()}
    if any("=" in e for e in entries):
        raise ValueError("--finetuned: use either TASK=DIR for all entries or plain DIRs")
    if len(entries) != len(tasks):
        raise ValueError(f"--finetuned got {len(entries)} dirs for {len(tasks)} tasks; give one "
                         "per task in --tasks order, or TASK=DIR pairs")
    return {t: Path(d) for t, d in zip(tasks, entries, strict=True)}


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    tasks = list(report["clean"]["tasks"])
    corr = list(report.get("corruptions", {}))
    has_ft = bool(report.get("finetuned"))
    cols = ["task", "top-1"] + (["fine-tuned", "normalized"] if has_ft else []) + corr
    lines = [f"# larv eval: {report['model']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name, clean, ft, norm, cvals):
        vals = [name, _fmt(clean)] + ([_fmt(ft), _fmt(norm)] if has_ft else [])
        return "| " + " | ".join(vals + [_fmt(v) for v in cvals]) + " |"

    for t in tasks:
        lines.append(row(t, report["clean"]["tasks"][t]["top1"],
                         report.get("finetuned", {}).get(t),
                         report.get("normalized", {}).get("tasks", {}).get(t),
                         [report["corruptions"][c]["tasks"][t]["top1"] for c in corr]))
    ft_avg = (sum(report["finetuned"].values()) / len(report["finetuned"])) if has_ft else None
    lines.append(row("**average**", report["clean"]["average"], ft_avg,
                     report.get("normalized", {}).get("average"),
                     [report["corruptions"][c]["average"] for c in corr]))
    if corr:
        lines += ["", f"Corruptions: severity {report['severity']}, table "
                      f"{report['corruption_table']}, seed {report['seed']}."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from larv_jax.checkpoint import load_params
    from larv_jax.eval import corruptions as corr_lib
    from larv_jax.eval.tasks import resolve_tasks
    from larv_jax.eval.zero_shot import evaluate, normalized_accuracy
    from larv_jax.io import write_json, write_text
    from larv_jax.models.tokenizer import load_tokenizer

    tasks = resolve_tasks(args.tasks)
    ft_dirs = _finetuned_map(args.finetuned, tasks)
    if args.corruptions in (None, ""):
        corruptions: list[str] = []
    elif args.corruptions == "all":
        corruptions = list(corr_lib.CORRUPTIONS)
    else:
        corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
        for c in corruptions:
            corr_lib.get_corruption(c)  # validate names before any work
    clip_cfg, clip_params = load_params(args.clip, allow_pickle=args.allow_pickle, act=args.act)
    if not clip_cfg.has_text or not clip_cfg.has_projection:
        raise ValueError(f"--clip {args.clip}: needs a CLIPModel (text tower + projections)")
    tokenizer = load_tokenizer(args.clip, context_length=clip_cfg.text.context_length)
    model_path = args.model or args.clip

    def vision(path: Path) -> dict[str, Any]:
        # fine-tunes share --clip's architecture: its activation, unless --act says otherwise
        cfg, params = load_params(path, allow_pickle=args.allow_pickle,
                                  act=args.act or clip_cfg.vision.act)
        if cfg.vision != clip_cfg.vision:
            raise ValueError(f"{path}: vision tower {cfg.vision} does not match --clip's "
                             f"{clip_cfg.vision}")
        return params

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    common = dict(tokenizer=tokenizer, heads_cache_dir=args.heads_cache or args.out / "heads",
                  batch_size=args.batch_size, limit=args.limit, seed=args.seed, dtype=dtype,
                  num_threads=args.threads, progress=True)
    params = vision(model_path)
    report: dict[str, Any] = {"model": str(model_path), "clip": str(args.clip),
                              "tasks": list(tasks), "limit": args.limit}
    report["clean"] = evaluate(params, clip_params, clip_cfg, list(tasks), args.data_dir, **common)
    if ft_dirs:
        ft = {}
        for task, d in ft_dirs.items():
            r = evaluate(vision(d), clip_params, clip_cfg, [task], args.data_dir, **common)
            ft[task] = r["tasks"][task]["top1"]
        report["finetuned"] = ft
        report["normalized"] = normalized_accuracy(
            {t: r["top1"] for t, r in report["clean"]["tasks"].items()}, ft)
    if corruptions:
        report.update(severity=args.severity, corruption_table=args.corruption_table,
                      seed=args.seed, corruptions={})
        for c in corruptions:
            report["corruptions"][c] = evaluate(
                params, clip_params, clip_cfg, list(tasks), args.data_dir, corruption=c,
                severity=args.severity, corruption_table=args.corruption_table, **common)
    write_json(args.out / "eval.json", report)
    md = markdown(report)
    write_text(args.out / "eval.md", md)
    print(md, end="")
    return 0
