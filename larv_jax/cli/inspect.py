"""``larv inspect PATH``: the parameter tree of a checkpoint (any supported format)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_output_arguments

    p = sub.add_parser("inspect", help="print a checkpoint's parameter tree and architecture",
                       description=__doc__)
    p.add_argument("path", type=Path, help="HF directory, .safetensors, OpenAI/open_clip .pt, "
                   "or an orbax directory written by `larv convert --to flax`")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow whole-module torch pickles (executes code; trusted files only)")
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, help="also write the description as JSON to this file (default: "
                                 "print only)")


def describe(path: Path, *, allow_pickle: bool = False, act: str | None = None) -> dict:
    from larv_jax import tree
    from larv_jax.checkpoint.convert import open_any

    config, flat, fmt, dtype = open_any(path, allow_pickle=allow_pickle, act=act)
    kind = ("CLIPModel" if config.has_text else
            "CLIPVisionModelWithProjection" if config.has_projection else "CLIPVisionModel")
    v = config.vision
    return {
        "path": str(path), "format": fmt, "architecture": config.name, "model": kind,
        "vision": f"width {v.width}, {v.layers} blocks, {v.heads} heads, patch {v.patch_size}, "
                  f"image {v.image_size}",
        "act": v.act,
        "text": (f"width {config.text.width}, {config.text.layers} blocks, vocab "
                 f"{config.text.vocab_size}" if config.text else None),
        "embed_dim": config.embed_dim, "source_dtype": dtype,
        "num_params": tree.num_params(flat),
        "leaves": [{"path": p, "shape": list(s.shape), "dtype": str(s.dtype)}
                   for p, s in flat.items()],
    }


def run(args: argparse.Namespace) -> int:
    from larv_jax.cli.common import report
    from larv_jax.cli.flags import check_out
    from larv_jax.io import write_json

    rep = report(args)
    if args.out is not None:
        check_out(args.out, [args.path], overwrite=args.overwrite)
    with rep.phase("read_s"):
        info = describe(args.path, allow_pickle=args.allow_pickle, act=args.act)
    rep.input("checkpoint", args.path)
    rep.results.update(info)  # --json: the description is the headline
    if args.out is not None:
        write_json(args.out, info)
        rep.output(args.out)
    for key in ("path", "format", "architecture", "model", "vision", "act", "text", "embed_dim",
                "source_dtype"):
        if info[key] is not None:
            print(f"{key:>13}: {info[key]}")
    print(f"{'parameters':>13}: {info['num_params']:,}")
    width = max(len(leaf["path"]) for leaf in info["leaves"])
    for leaf in info["leaves"]:
        print(f"  {leaf['path']:<{width}}  {str(tuple(leaf['shape'])):<22} {leaf['dtype']}")
    return 0
