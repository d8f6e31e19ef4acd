"""``larv run --config configs/NAME.py[:ARG]``: an experiment grid (mergers x LARV gates x options).

The config (``get_config(arg)`` returning an ``ml_collections.ConfigDict``; see
``configs/larv_common.py`` for the fields) names the base, the fine-tuned models and the grid.
Task vectors, the base cache and each merger's diagnostics are computed once and reused across the
grid (``larv_jax.larv.grid``). Results: ``<out_dir>/results.jsonl`` (one JSON object per cell,
rewritten atomically after every cell), ``results.md`` (a table), ``config.json`` (the resolved
config) and ``diagnostics_<merger>.json`` per merger.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_output_arguments

    p = sub.add_parser("run", help="run an experiment grid from a configs/*.py file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="config file, optionally with its get_config argument after a colon, "
                        "e.g. configs/b32_ta8.py:quick,checkpoint_dir=/data (required)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field (dotted keys, Python literal values), "
                        "repeatable (default: none)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where the checkpoints are (default: the config's checkpoint_dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved grid and checkpoint paths, run nothing (default: off)")
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, help="output directory (default: the config's out_dir)",
                         overwrite_help="replace an existing results.jsonl in the output "
                                        "directory (default: refuse)",
                         aliases=("--out-dir",))


# -- config loading ----------------------------------------------------------------------------

def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()):
    """``FILE[:ARG]`` -> ConfigDict, with ``KEY=VALUE`` overrides applied."""
    import importlib.util
    import sys

    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    sys.path.insert(0, str(path.resolve().parent))
    try:
        mod_spec = importlib.util.spec_from_file_location(f"larv_config_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{path}: defines no get_config(arg)")
        config = module.get_config(arg or None)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {_config_error(e)}") from e
    except Exception as e:  # noqa: BLE001 -- a config is user code: its failure is one line
        raise ValueError(f"{path}: {_config_error(e)}") from e
    finally:
        sys.path.pop(0)
    for item in overrides:
        set_field(config, item)
    return config


def _config_error(e: BaseException) -> str:
    """A config file's exception in one line, with the line of the file it was raised at."""
    import traceback

    if isinstance(e, SyntaxError):
        return f"line {e.lineno}: {e.msg}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(str(Path(__file__).parent))]
    where = f"{Path(frames[-1].filename).name} line {frames[-1].lineno}: " if frames else ""
    text = repr(e.args[0]) if isinstance(e, KeyError) and e.args else e
    return f"{where}{type(e).__name__}: {text}"


def set_field(config, item: str) -> None:
    from larv_jax.cli.flags import parse_key_values

    ((key, value),) = parse_key_values([item], "--set").items()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise ValueError(f"--set {item!r}: config has no field {key!r}")
        node = node[p]
    if leaf not in node:
        raise ValueError(f"--set {item!r}: config has no field {key!r}")
    node[leaf] = value


def resolve_checkpoint(ident: str, checkpoint_dir: str | Path) -> Path:
    """A path that exists, or a Hugging Face id found under ``checkpoint_dir``."""
    direct = Path(ident).expanduser()
    if direct.exists():
        return direct
    root = Path(checkpoint_dir).expanduser()
    org, _, name = ident.rpartition("/")
    tried = [root / ident, root / name]
    for cand in tried:
        if cand.exists():
            return cand
    if org:
        snaps = sorted((root / f"models--{org}--{name}" / "snapshots").glob("*"))
        if snaps:
            return snaps[-1]
        tried.append(root / f"models--{org}--{name}" / "snapshots" / "*")
    raise FileNotFoundError(f"checkpoint {ident!r} not found; tried: {', '.join(map(str, tried))}")


# -- orchestration -----------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    """Results table: one line per cell."""
    tasks: list[str] = []
    for r in rows:
        for t in (r.get("eval") or {}).get("tasks", {}):
            if t not in tasks:
                tasks.append(t)
    head = ["merger", "svc", "gate", "apply", "tiers (s: count)", "||theta - theta0||"]
    head += ["avg top-1"] + tasks if tasks else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tiers = ", ".join(f"{k}: {v}" for k, v in r["tiers"].items()) or "continuous"
        cells = [r["merger"], "yes" if r["svc"] else "no", r["gate"], r["apply"], tiers,
                 f"{r['update_norm']:.4f}"]
        if tasks:
            ev = r.get("eval") or {}
            cells.append(f"{100 * ev['average']:.2f}" if "average" in ev else "")
            cells += [f"{100 * ev['tasks'][t]['top1']:.2f}" if t in ev.get("tasks", {}) else ""
                      for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _evaluator(config, base_ckpt_dir: Path, base_flat, model_config):
    from larv_jax import tree as ltree
    from larv_jax.eval import evaluate
    from larv_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(base_ckpt_dir)
    clip_params = ltree.unflatten(base_flat)
    e = config.eval

    def run_eval(params_flat):
        vision = ltree.unflatten({p: v for p, v in params_flat.items() if p.startswith("visual/")})
        return evaluate(vision, clip_params, model_config, list(config.eval_tasks),
                        e.data_dir or None, tokenizer=tok,
                        heads_cache_dir=e.heads_cache_dir or None, batch_size=int(e.batch_size),
                        limit=int(e.limit) or None)

    return run_eval


def run(args: argparse.Namespace) -> int:
    import collections
    import functools
    import json
    import time

    from larv_jax.cli.common import report

    rep = report(args)
    config = load_config(args.config, args.overrides)
    ckpt_dir = args.checkpoint_dir or config.checkpoint_dir
    out_dir = Path(args.out or config.out_dir)
    base_path = resolve_checkpoint(config.base, ckpt_dir)
    model_paths = [resolve_checkpoint(m, ckpt_dir) for m in config.models]
    mergers = [dict(m) for m in config.mergers]
    gates = [dict(g) for g in config.gates]
    print(f"larv run: {config.name}: {len(mergers)} mergers x {len(gates)} gates, "
          f"{len(model_paths)} models, base {base_path}")
    rep.input("config", args.config.partition(":")[0])
    rep.input("base", base_path)
    for mp in model_paths:
        rep.input("model", mp)
    if args.dry_run:
        rep.plan = {"config": config.name, "out": str(out_dir), "base": str(base_path),
                    "models": [str(m) for m in model_paths],
                    "cells": [{"merger": m.get("name", m["method"]), "svc": bool(m.get("svc")),
                               "gate": g.get("name") or g["gate"],
                               "options": dict(g.get("options") or {}),
                               "apply": g.get("apply", "post")} for m in mergers for g in gates]}
        for mp in model_paths:
            print(f"  model {mp}")
        for m in mergers:
            for g in gates:
                print(f"  cell {m.get('name', m['method'])} svc={bool(m.get('svc'))} x "
                      f"{g.get('name') or g['gate']} {g.get('options') or ''} "
                      f"apply={g.get('apply', 'post')}")
        return 0
    results_path = out_dir / "results.jsonl"
    if results_path.exists() and not args.overwrite:
        raise FileExistsError(f"{results_path} exists (pass --overwrite to replace it)")

    from larv_jax import diagnostics as dg
    from larv_jax.caches import base_cache_dir
    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.io import atomic_path, write_json, write_text
    from larv_jax.larv import grid
    from larv_jax.merging import bind, bind_svc, task_vectors

    t0 = time.perf_counter()
    act = args.act or config.get("act") or None  # the flag, else the config's optional act
    base_ckpt = load_checkpoint(base_path, act=act)
    base_flat = base_ckpt.flat()
    # fine-tunes share the base's architecture: its activation, unless --act says otherwise
    models = [load_checkpoint(m, act=act or base_ckpt.config.vision.act)
              for m in model_paths]
    tau = task_vectors(base_ckpt, models)  # one leaf of each model at a time
    print(f"  task vectors: {len(tau)} leaves x {len(model_paths)} models "
          f"({time.perf_counter() - t0:.1f} s)")
    write_json(out_dir / "config.json", config.to_dict())
    evaluate = None
    if config.eval.enabled:
        evaluate = _evaluator(config, base_path, base_flat, base_ckpt.config)

    def on_diagnostics(label, diagnostics):
        dg.to_json(diagnostics, out_dir / f"diagnostics_{label}.json")
        rep.output(out_dir / f"diagnostics_{label}.json")

    def on_params(row, params):
        from larv_jax.checkpoint import save_hf

        vision = {p: v for p, v in params.items() if p.startswith("visual/")}
        cfg = base_ckpt.config.vision_only()
        if "visual/proj/kernel" in vision:
            vision.pop("visual/proj/kernel")
        label = f"{row['merger']}{'_svc' if row['svc'] else ''}_{row['gate']}_{row['apply']}"
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
        row["params_dir"] = str(save_hf(vision, cfg, out_dir / "params" / safe))
        rep.output(row["params_dir"])

    d = config.diagnostics
    counters: collections.Counter = collections.Counter()
    rows: list[dict] = []
    for row in grid.run_grid(
            base=base_flat, tau=tau, mergers=mergers, gates=gates,
            resolve_merger=functools.partial(bind, model=base_ckpt.config.name),
            resolve_svc=bind_svc, granularity=config.granularity,
            diag_mode=d.mode, base_mode=d.base_mode, seed=int(d.seed),
            diag_options={"k": int(d.k), "p": int(d.p), "q": int(d.q)}, evaluate=evaluate,
            counters=counters, on_diagnostics=on_diagnostics, base_store=base_cache_dir(),
            on_params=on_params if config.save_params else None):
        rows.append(row)
        with atomic_path(results_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_text(out_dir / "results.md", markdown(rows))
        avg = (row.get("eval") or {}).get("average")
        print(f"  {row['merger']:<10} svc={'y' if row['svc'] else 'n'} {row['gate']:<24} "
              f"{row['apply']:<4} tiers {row['tiers']}"
              + (f"  avg top-1 {100 * avg:.2f}" if avg is not None else ""))
    rep.timings["grid_s"] = time.perf_counter() - t0
    for name in ("config.json", "results.jsonl", "results.md"):
        rep.output(out_dir / name)
    rep.results.update(config=config.name, cells=[
        {k: r.get(k) for k in ("merger", "svc", "gate", "apply", "tiers", "update_norm")}
        | {"average_top1": (r.get("eval") or {}).get("average")} for r in rows],
        counters=dict(counters))
    print(f"larv run: {len(rows)} cells in {time.perf_counter() - t0:.1f} s "
          f"({dict(counters)}); wrote {results_path} and {out_dir / 'results.md'}")
    return 0
