"""The ``--larv*`` flags of ``larv merge`` and the one function that turns them into keyword
arguments (:func:`larv_kwargs`); nothing below the CLI sees an ``argparse.Namespace``.

Flags: ``--larv SPEC`` (``none`` default: the plain merge), ``--larv-set KEY=VALUE`` (repeatable gate
and score options), ``--larv-apply post|pre``, ``--larv-granularity module|block``,
``--larv-mode randomized|exact``, ``--larv-base-mode exact|randomized``, ``--larv-seed N``,
``--larv-k/p/q``, ``--larv-svc-order svc_first|larv_first``.

``--act gelu|quick_gelu`` (:func:`add_act_argument`) is on every command that reads checkpoints.

Module-level imports stay light (argparse): CLI modules are all imported to build the parser.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

SPEC_HELP = ("LARV gate or depth schedule: tiered | continuous | none | uniform(C) | linear | "
             "tier2 | tier3 | tier6 | tier12 | thirds(S_S,S_M,S_D); options in parentheses, e.g. "
             "'tiered(alpha=0.25)' (default: none = the plain merge)")


def parse_key_values(items: Sequence[str] | None, flag: str = "--set", *,
                     identifiers: bool = False) -> dict[str, Any]:
    """``["alpha=0.25", "tiers=0.4,1,1.6", "use_c=false"]`` -> ``{"alpha": 0.25, ...}``: the one
    KEY=VALUE parser (``--set``, ``--larv-set``, config overrides).

    Values are Python literals; ``true``/``false`` (any case) are booleans; anything else that
    is not a literal stays a string. ``identifiers``: keys must be Python identifiers.
    Raises ValueError naming ``flag`` for an item without ``=`` or without a key.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or (identifiers and not key.isidentifier()):
            raise ValueError(f"{flag} expects KEY=VALUE; got {item!r}")
        raw = raw.strip()
        if raw.lower() in ("true", "false"):
            out[key] = raw.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            out[key] = raw
    return out


ACT_HELP = ("the towers' activation, which no weight shows: gelu (exact erf GELU: open_clip's "
            "default configs ViT-B-32, ViT-B-16, ..., e.g. LAION-2B and DataComp weights) or "
            "quick_gelu (OpenAI CLIP, open_clip's *-quickgelu models). Default: what the "
            "checkpoint says (config.json hidden_act, open_clip_config.json model_cfg.quick_gelu, "
            "QuickGELU for an OpenAI TorchScript archive), else quick_gelu with a warning; "
            "fine-tuned models take the base's (--base, --clip). Given, it applies to every "
            "checkpoint the command reads and wins over the files' configs (a warning names both "
            "where they differ)")


def add_act_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--act gelu|quick_gelu`` (default None: read from each checkpoint) to ``parser``:
    every command that reads checkpoints calls this, and passes ``args.act`` on as ``act=``."""
    from larv_jax.models.config import ACTS

    parser.add_argument("--act", choices=ACTS, default=None, help=ACT_HELP)
    return parser


def add_larv_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--larv*`` flags (in their own argument group) to ``parser``."""
    g = parser.add_argument_group("LARV veneer (SPEC §3)")
    g.add_argument("--larv", default="none", metavar="SPEC", help=SPEC_HELP)
    g.add_argument("--larv-set", action="append", default=[], metavar="KEY=VALUE",
                   help="gate/score option, repeatable: alpha, beta, tiers=0.5,1,1.5, gamma, "
                        "eta, rho, zeta, use_e, use_r, use_c=false (default: the paper's values)")
    g.add_argument("--larv-apply", choices=("post", "pre"), default="post",
                   help="post: theta0 + s*D; pre: scale each task vector before the merger, s from "
                        "the unscaled merge (default: post)")
    g.add_argument("--larv-granularity", choices=("module", "block"), default="module",
                   help="LARV units: module (L = 1 + 3B (+1)) or block (L = B) (default: module)")
    g.add_argument("--larv-mode", choices=("randomized", "exact"), default="randomized",
                   help="diagnostics of the merged delta (default: randomized)")
    g.add_argument("--larv-base-mode", choices=("exact", "randomized"), default="exact",
                   help="r_eff of the pretrained weights (default: exact)")
    g.add_argument("--larv-seed", type=int, default=0,
                   help="PRNG seed of the randomized SVD (default: 0)")
    g.add_argument("--larv-k", type=int, default=64, help="randomized SVD rank (default: 64)")
    g.add_argument("--larv-p", type=int, default=10, help="oversampling (default: 10)")
    g.add_argument("--larv-q", type=int, default=2, help="power iterations (default: 2)")
    g.add_argument("--larv-svc-order", choices=("svc_first", "larv_first"), default="svc_first",
                   help="with SVC: merge -> SVC -> LARV (svc_first) or merge -> LARV -> SVC "
                        "(default: svc_first)")
    return parser


def larv_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--larv*`` flags as keyword arguments: ``gate``, ``gate_options`` (``--larv-set``),
    ``apply``, ``granularity``, ``mode``, ``base_mode``, ``seed``, ``diag_options`` (k, p, q),
    ``svc_order``. The spec is parsed here, so an unknown name fails before any work."""
    from larv_jax.larv import schedules

    schedules.parse_spec(args.larv)
    return dict(gate=args.larv, gate_options=parse_key_values(args.larv_set, "--larv-set",
                                                              identifiers=True),
                apply=args.larv_apply, granularity=args.larv_granularity, mode=args.larv_mode,
                base_mode=args.larv_base_mode, seed=args.larv_seed,
                diag_options={"k": args.larv_k, "p": args.larv_p, "q": args.larv_q},
                svc_order=args.larv_svc_order)


def check_out(out, inputs: Sequence[Any], *, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output path that would replace something it should not.

    FileExistsError when ``out`` exists and ``overwrite`` is off; ValueError, whatever
    ``overwrite`` says, when ``out`` is one of the ``inputs``, lies inside one, or holds one
    (replacing it would delete an input before it is read, or while it is).
    """
    from pathlib import Path

    target = Path(out).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if target == src or target in src.parents or src in target.parents:
            raise ValueError(f"{flag} {out} would replace or sit inside the input {inp}; "
                             f"pick another {flag}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
