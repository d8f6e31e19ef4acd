"""``larv eval``: zero-shot top-1 of a (merged) vision tower on the task suites.

    larv eval --model merged/ --clip openai-clip-vit-b32/ --tasks TA8 --data-dir ~/tensorflow_datasets \\
        [--corruptions all --severity 3] [--finetuned ft/sun397 ft/stanford_cars ...] --out results/

Writes ``<out>/eval.json`` and ``<out>/eval.md`` (atomically): top-1 per task, the suite average,
normalized accuracy (merged / fine-tuned) when fine-tuned models are given, and one column per
corruption when asked. ``--clip`` is the pretrained CLIPModel directory (text tower, tokenizer,
visual projection); ``--model`` defaults to it (the zero-shot baseline).

The offline zoo's tasks, as ``larv demo`` scores them: ``zoo/<task>`` names, or ``--tasks zoo``
for every task of the zoo under ``--data-dir`` (a zoo directory or its ``data/``):

    larv eval --model merged/ --clip results/zoo/pretrained --data-dir results/zoo \\
        --tasks zoo/colours,zoo/digits \\
        --finetuned results/zoo/finetuned/colours results/zoo/finetuned/digits --out eval-zoo/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NamedTuple


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_dry_run_argument, add_output_arguments

    p = sub.add_parser("eval", help="zero-shot evaluation on the TFDS task suites",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="vision model to evaluate (HF dir, .safetensors, .pt); default: --clip")
    p.add_argument("--clip", type=Path, required=True,
                   help="pretrained CLIPModel dir (config.json, weights, tokenizer.json)")
    p.add_argument("--tasks", default="TA8",
                   help="TA8 | TALL14 | TALL20 | UNSEEN | zoo | comma-separated task names "
                        "(zoo/<task> for a task of the offline zoo: zoo/colours, ...; the zoo "
                        "suite is every zoo task under --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data_dir (default: TFDS's own); for the zoo's tasks a zoo "
                        "directory (larv zoo build --out) or its data/ directory")
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
    add_dry_run_argument(p)
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, required=True,
                         help="output directory for eval.json and eval.md (required)",
                         overwrite_help="replace an existing <out>/eval.json (default: refuse)")


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


class EvalPlan(NamedTuple):
    tasks: tuple[str, ...]
    ft_dirs: dict[str, Path]
    corruptions: list[str]
    clip: Any                 # the opened --clip checkpoint (nothing read but headers)
    model: Any                # the opened --model checkpoint
    finetuned: dict[str, Any]  # {task: opened fine-tuned checkpoint}
    tokenizer: Any
    sources: dict[str, Any]   # {task: its opened TFDS data source}
    summary: dict


def plan(args: argparse.Namespace) -> EvalPlan:
    """Every check ``larv eval`` makes before its first weight or image is read: the task,
    corruption and --finetuned names, the output, the checkpoints opened (a CLIPModel for --clip,
    every vision tower matching its architecture), the tokenizer, every task's data source under
    --data-dir. Raises the error the real run would give."""
    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.cli.common import checkpoint_reads, numel, peak_memory
    from larv_jax.cli.flags import check_out
    from larv_jax.eval import corruptions as corr_lib
    from larv_jax.eval.data import dataset_size, open_source
    from larv_jax.eval.tasks import get_task, resolve_tasks
    from larv_jax.models.tokenizer import load_tokenizer

    tasks = resolve_tasks(args.tasks, args.data_dir)
    ft_dirs = _finetuned_map(args.finetuned, tasks)
    if args.corruptions in (None, ""):
        corruptions: list[str] = []
    elif args.corruptions == "all":
        corruptions = list(corr_lib.CORRUPTIONS)
    else:
        corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
        for c in corruptions:
            corr_lib.get_corruption(c)  # validate names before any work
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    model_path = args.model or args.clip
    check_out(args.out, [args.clip, model_path, *ft_dirs.values()], overwrite=True)
    if (args.out / "eval.json").exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / 'eval.json'} exists (pass --overwrite to replace it)")
    clip = load_checkpoint(args.clip, allow_pickle=args.allow_pickle, act=args.act)
    clip_cfg = clip.config
    if not clip_cfg.has_text or not clip_cfg.has_projection:
        raise ValueError(f"--clip {args.clip}: needs a CLIPModel (text tower + projections)")
    tokenizer = load_tokenizer(args.clip, context_length=clip_cfg.text.context_length)

    def vision(path: Path):
        # fine-tunes share --clip's architecture: its activation, unless --act says otherwise
        ckpt = load_checkpoint(path, allow_pickle=args.allow_pickle,
                               act=args.act or clip_cfg.vision.act)
        if ckpt.config.vision != clip_cfg.vision:
            raise ValueError(f"{path}: vision tower {ckpt.config.vision} does not match --clip's "
                             f"{clip_cfg.vision}")
        return ckpt

    model = clip if model_path == args.clip else vision(model_path)
    finetuned = {t: vision(d) for t, d in ft_dirs.items()}
    sources = {t: open_source(get_task(t), args.data_dir) for t in tasks}
    sizes = {t: dataset_size(src, args.limit) for t, src in sources.items()}

    v = clip_cfg.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    params = {role: 4 * sum(numel(c.shape(q)) for q in c.paths() if role == "clip"
                            or q.startswith("visual/"))
              for role, c in (("clip", clip), ("model", model))}
    passes = (1 + len(corruptions)) * sum(sizes.values()) + sum(sizes[t] for t in ft_dirs)
    summary = {
        "reads": checkpoint_reads([("clip", clip)] + ([("model", model)] if model is not clip
                                                      else [])
                                  + [(f"finetuned {t}", c) for t, c in finetuned.items()])
        + [{"role": f"data {t}", "path": f"{get_task(t).source} split {get_task(t).split} "
            f"(data_dir {args.data_dir or 'TFDS default'})", "examples": sizes[t]}
           for t in tasks],
        "computes": [f"zero-shot heads of {len(tasks)} tasks (cached under "
                     f"{args.heads_cache or args.out / 'heads'})",
                     f"top-1 on {', '.join(f'{t} ({sizes[t]})' for t in tasks)}"
                     + (f"; corruptions {', '.join(corruptions)} at severity {args.severity}"
                        if corruptions else "")
                     + (f"; fine-tuned references for {', '.join(ft_dirs)}" if ft_dirs else ""),
                     f"{passes} images through the image tower in batches of {args.batch_size} "
                     f"({args.dtype})"],
        "writes": [str(args.out / "eval.json"), str(args.out / "eval.md"),
                   str(args.heads_cache or args.out / "heads") + "/ (head cache)"],
        "memory": peak_memory({
            "clip_f32": params["clip"], "model_f32": params["model"] if model is not clip else 0,
            "finetuned_f32": params["model"] if ft_dirs else 0,
            "image_batch_f32": 4 * args.batch_size * 3 * v.image_size ** 2,
            "activations_one_block_f32": 4 * args.batch_size * tokens * (4 * v.width
                                                                         + v.mlp_dim)}),
    }
    return EvalPlan(tasks, ft_dirs, corruptions, clip, model, finetuned, tokenizer, sources,
                    summary)


def run(args: argparse.Namespace) -> int:
    from larv_jax.cli.common import run_planned

    return run_planned(args, "eval", plan, execute)


def execute(args: argparse.Namespace, p: EvalPlan) -> int:
    """The evaluation itself, on a checked :class:`EvalPlan`."""
    import jax.numpy as jnp

    from larv_jax.cli.common import report
    from larv_jax.eval.zero_shot import evaluate, normalized_accuracy
    from larv_jax.io import write_json, write_text

    rep = report(args)
    tasks, ft_dirs, corruptions = p.tasks, p.ft_dirs, p.corruptions
    model_path = args.model or args.clip
    with rep.phase("load_s"):
        clip_cfg, clip_params = p.clip.config, p.clip.params()
        params = clip_params if p.model is p.clip else p.model.params()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    common = dict(tokenizer=p.tokenizer, heads_cache_dir=args.heads_cache or args.out / "heads",
                  batch_size=args.batch_size, limit=args.limit, seed=args.seed, dtype=dtype,
                  num_threads=args.threads, progress=True, sources=p.sources)
    report_: dict[str, Any] = {"model": str(model_path), "clip": str(args.clip),
                               "tasks": list(tasks), "limit": args.limit}
    with rep.phase("clean_s"):
        report_["clean"] = evaluate(params, clip_params, clip_cfg, list(tasks), args.data_dir,
                                    **common)
    if ft_dirs:
        ft = {}
        with rep.phase("finetuned_s"):
            for task in ft_dirs:
                r = evaluate(p.finetuned[task].params(), clip_params, clip_cfg, [task],
                             args.data_dir, **common)
                ft[task] = r["tasks"][task]["top1"]
        report_["finetuned"] = ft
        report_["normalized"] = normalized_accuracy(
            {t: r["top1"] for t, r in report_["clean"]["tasks"].items()}, ft)
    if corruptions:
        report_.update(severity=args.severity, corruption_table=args.corruption_table,
                       seed=args.seed, corruptions={})
        with rep.phase("corruptions_s"):
            for c in corruptions:
                report_["corruptions"][c] = evaluate(
                    params, clip_params, clip_cfg, list(tasks), args.data_dir, corruption=c,
                    severity=args.severity, corruption_table=args.corruption_table, **common)
    write_json(args.out / "eval.json", report_)
    md = markdown(report_)
    write_text(args.out / "eval.md", md)
    rep.input("clip", args.clip)
    if args.model is not None:
        rep.input("model", args.model)
    for t, d in ft_dirs.items():
        rep.input(f"finetuned {t}", d)
    rep.output(args.out / "eval.json")
    rep.output(args.out / "eval.md")
    rep.results.update(
        tasks={t: r["top1"] for t, r in report_["clean"]["tasks"].items()},
        average=report_["clean"]["average"],
        normalized_average=report_.get("normalized", {}).get("average"),
        corruptions={c: r["average"] for c, r in report_.get("corruptions", {}).items()})
    print(md, end="")
    return 0
