"""``larv zoo build``: make the offline model zoo (tiny CLIP, 8 tasks, HF checkpoints, TFDS data).

A small CLIP (32x32 images, patch 8, 6 vision blocks, width 64; 3 text blocks over a word-level
vocabulary) is pretrained contrastively on procedurally generated captioned images, then its vision
tower is fine-tuned on each task (digits from scikit-learn, shapes, colours, counts, positions,
textures, orientations, sizes; each task drawn on its own input domain) against frozen zero-shot
heads (AdamW, lr 3e-4, 300 steps). Nothing is downloaded. The zoo is
rebuilt only when the seed or the spec changes (see ``manifest.json``). ``larv zoo show`` prints a
zoo's manifest: per-task zero-shot and fine-tuned top-1, timings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("results/zoo")
DEFAULT_OUT_QUICK = Path("results/zoo-quick")


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_output_arguments

    p = sub.add_parser("zoo", help="build the offline tiny CLIP model zoo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION")
    b = zsub.add_parser("build", help="build (or reuse) a zoo",
                        description="Build the zoo, or reuse it when its manifest has the same "
                                    "seed and spec.")
    b.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    b.add_argument("--quick", action="store_true",
                   help="tiny zoo in seconds: 3 tasks, 2 blocks, few steps (default: off)")
    add_common_arguments(b)
    add_output_arguments(b, help=f"zoo directory (default: {DEFAULT_OUT}, or {DEFAULT_OUT_QUICK} "
                                 "with --quick)",
                         overwrite_help="rebuild even when the manifest matches (default: reuse "
                                        "a zoo of the same seed and spec)",
                         overwrite_aliases=("--force",))
    s = zsub.add_parser("show", help="print a zoo's manifest summary")
    s.add_argument("--zoo", type=Path, default=DEFAULT_OUT,
                   help=f"zoo directory (default: {DEFAULT_OUT})")
    add_common_arguments(s)
    add_output_arguments(s, help="also write the summary (markdown) to this file (default: "
                                 "print only)")


def default_zoo_dir(quick: bool) -> Path:
    return DEFAULT_OUT_QUICK if quick else DEFAULT_OUT


def format_manifest(manifest: dict) -> str:
    """A markdown table of the manifest's per-task accuracies plus the timings."""
    lines = ["| task | classes | zero-shot top-1 | fine-tuned top-1 |", "|---|---:|---:|---:|"]
    for name, t in manifest["tasks"].items():
        lines.append(f"| {name} | {len(t['classes'])} | {100 * t['zero_shot_top1']:.1f} | "
                     f"{100 * t['finetuned_top1']:.1f} |")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in manifest.get("timings_s", {}).items())
    lines += ["", f"seed {manifest['seed']}, spec {manifest['spec_hash']}"
              f"{' (quick)' if manifest.get('quick') else ''}; build: {timings}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    from larv_jax.cli.common import report
    from larv_jax.zoo import build_zoo

    rep = report(args)
    action = getattr(args, "zoo_command", None)
    if action == "show":
        path = args.zoo / "manifest.json"
        if args.out is not None:
            from larv_jax.cli.flags import check_out

            check_out(args.out, [args.zoo], overwrite=args.overwrite)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no zoo manifest (build one with `larv zoo build`)")
        manifest = json.loads(path.read_text())
        rep.input("manifest", path)
        rep.results.update(_headline(manifest))
        text = format_manifest(manifest)
        if args.out is not None:
            from larv_jax.io import write_text

            write_text(args.out, text + "\n")
            rep.output(args.out)
        print(text)
        return 0
    if action != "build":
        print("usage: larv zoo {build,show} ... (see larv zoo --help)")
        return 2
    out = args.out or default_zoo_dir(args.quick)
    with rep.phase("build_s"):
        manifest = build_zoo(out, seed=args.seed, quick=args.quick, force=args.overwrite,
                             progress=not args.no_progress, log=print)
    # the manifest's own sha256 of every file: the outputs' hashes come for free
    rep.outputs.extend(str(out / f) for f in manifest.get("files", {}))
    rep.results.update(_headline(manifest), files_sha256=manifest.get("files", {}))
    print(format_manifest(manifest))
    return 0


def _headline(manifest: dict) -> dict:
    """The numbers `larv zoo show` prints: per-task zero-shot and fine-tuned top-1, timings."""
    return {"seed": manifest.get("seed"), "spec_hash": manifest.get("spec_hash"),
            "quick": bool(manifest.get("quick")),
            "tasks": {n: {"classes": len(t["classes"]), "zero_shot_top1": t["zero_shot_top1"],
                          "finetuned_top1": t["finetuned_top1"]}
                      for n, t in manifest["tasks"].items()},
            "build_timings_s": manifest.get("timings_s", {})}
