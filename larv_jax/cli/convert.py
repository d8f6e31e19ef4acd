"""``larv convert SRC --to hf|flax --out DST``: between Hugging Face, OpenAI / open_clip and orbax."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_output_arguments

    p = sub.add_parser("convert", help="convert between HF / OpenAI / open_clip / orbax formats",
                       description=__doc__)
    p.add_argument("src", type=Path, help="HF directory or .safetensors, OpenAI/open_clip "
                   ".pt/.bin, or an orbax directory written by this command")
    p.add_argument("--to", required=True, choices=["hf", "flax"],
                   help="hf: model.safetensors + config.json that transformers loads; "
                   "flax: an orbax checkpoint (params/ + config.json)")
    p.add_argument("--vision-only", action="store_true",
                   help="keep only the vision tower (CLIPVisionModel); default: keep everything")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow whole-module torch pickles (executes code; trusted files only)")
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, required=True, help="output directory, written atomically "
                                                "(required)")


def run(args: argparse.Namespace) -> int:
    from larv_jax.checkpoint.convert import convert
    from larv_jax.cli.common import report
    from larv_jax.cli.flags import check_out

    rep = report(args)
    check_out(args.out, [args.src], overwrite=args.overwrite)
    rep.input("checkpoint", args.src)
    with rep.phase("convert_s"):
        out = convert(args.src, args.out, to=args.to, vision_only=args.vision_only,
                      allow_pickle=args.allow_pickle, overwrite=args.overwrite, act=args.act)
    rep.output(out)
    rep.results.update(to=args.to, vision_only=args.vision_only, out=str(out))
    print(f"wrote {out}")
    return 0
