"""``larv merge --base B --models M1 M2 ... --method NAME --out DIR``: data-free merging.

Streams the checkpoints leaf by leaf (larv_jax.merging.merge_delta), applies theta0 + D, and
writes a Hugging Face directory (model.safetensors + config.json, the base's architecture) plus
merge_report.json, atomically.

``larv merge --config configs/b32_ta8.py:best,checkpoint_dir=DIR``: the same merge described by a
``larv run`` config with one merger and one gate (base, models, the merger's method, options and
SVC, the gate, the LARV granularity and diagnostics settings, out_dir). A flag given on the
command line replaces the config's value; ``--set`` and ``--larv-set`` add to the config's method
and gate options and win over them key by key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_dry_run_argument, add_output_arguments

    p = sub.add_parser("merge", help="merge fine-tuned checkpoints (optionally with LARV)",
                       description=__doc__)
    p.add_argument("--config", metavar="FILE[:ARG]", default=None,
                   help="a larv run config with one merger and one gate, e.g. "
                        "configs/b32_ta8.py:best,checkpoint_dir=/data; flags given here win "
                        "over its values (default: none, the flags say everything)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="with --config: where its checkpoint ids live (default: the config's "
                        "checkpoint_dir)")
    p.add_argument("--base", type=Path,
                   help="pretrained checkpoint theta0 (HF dir / .safetensors / OpenAI .pt); "
                        "required without --config")
    p.add_argument("--models", nargs="+", type=Path,
                   help="fine-tuned checkpoints theta_1..theta_K (same keys and shapes); "
                        "required without --config")
    from larv_jax.merging.registry import METHODS

    p.add_argument("--method", choices=list(METHODS),
                   help="base merger (SPEC §4); its defaults are FusionBench's; required "
                        "without --config")
    p.add_argument("--scale", type=float, default=None,
                   help="the method's global coefficient (default: the method's own, e.g. TA "
                   "0.3, TIES 0.3, Iso-C by backbone; not for simple_average / dare_average)")
    p.add_argument("--svc", action=argparse.BooleanOptionalAction, default=False,
                   help="apply singular value calibration (SPEC §5); --no-svc turns off a "
                        "config's (default: off)")
    p.add_argument("--svc-alpha", type=float, default=None,
                   help="SVC alpha (default: by method, 0.1; 0.2 Iso-CTS; 1.0 TSV-M)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter, e.g. --set keep=0.1 --set p=0.9 "
                   "(value parsed as a Python literal, else a string); default: none")
    p.add_argument("--seed", type=int, default=None,
                   help="PRNG seed for DARE's masks (default: 0, the method's default key)")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the inputs' sha256 in the report (default: hash them)")
    from larv_jax.cli.flags import add_larv_arguments

    add_larv_arguments(p)
    add_dry_run_argument(p)
    from larv_jax.cli.flags import add_act_argument

    add_act_argument(p)
    add_common_arguments(p)
    add_output_arguments(p, help="output directory (HF format; required without --config, "
                                 "whose out_dir is the default)")
    # the flags a config can give: unset on the namespace unless typed, so that the config fills
    # exactly the ones the command line left out (resolve_args)
    for action in p._actions:
        if action.dest in CONFIGURABLE:
            _DEFAULTS[action.dest] = action.default
            action.default = argparse.SUPPRESS


CONFIGURABLE = ("base", "models", "method", "scale", "svc", "svc_alpha", "seed", "larv",
                "larv_apply", "larv_granularity", "larv_mode", "larv_base_mode", "larv_seed",
                "larv_k", "larv_p", "larv_q", "larv_svc_order", "act", "out")
_DEFAULTS: dict[str, Any] = {}
REQUIRED = {"base": "--base", "models": "--models", "method": "--method", "out": "--out"}
# larv run config fields larv merge reads; the others describe evaluation or a grid's table
CONFIG_FIELDS = {"base", "models", "checkpoint_dir", "mergers", "gates", "granularity",
                 "diagnostics", "out_dir", "act"}
CONFIG_IGNORED = {"name", "tasks", "eval", "eval_tasks", "save_params"}


def resolve_args(args: argparse.Namespace) -> None:
    """Fill ``args`` in place: the flags typed on the command line, then ``--config``'s values
    for the others, then the flags' defaults. Sets ``args.config_options`` (the config merger's
    method options) and ``args.config_gate_options`` (its gate's options), which ``--set`` and
    ``--larv-set`` extend. Raises :class:`larv_jax.cli.common.UsageError` (exit 2) for a
    required flag that neither gives."""
    from larv_jax.cli.common import UsageError

    if getattr(args, "_resolved", False):
        return
    args.config_options, args.config_gate_options = {}, {}
    if getattr(args, "config", None):
        for dest, value in _from_config(args).items():
            if not hasattr(args, dest):
                setattr(args, dest, value)
    for dest in CONFIGURABLE:
        if not hasattr(args, dest):
            setattr(args, dest, _DEFAULTS.get(dest))
    missing = [flag for dest, flag in REQUIRED.items() if getattr(args, dest) is None]
    if missing:
        where = (f"; {args.config.partition(':')[0]} gives none" if getattr(args, "config", None)
                 else " (or --config FILE)")
        raise UsageError(f"the following arguments are required: {', '.join(missing)}{where}")
    args._resolved = True


def _from_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--config FILE[:ARG]`` as flag values (``{dest: value}``); one merger and one gate."""
    from larv_jax.cli.common import report
    from larv_jax.cli.run import load_config, resolve_checkpoint

    path = args.config.partition(":")[0]
    c = load_config(args.config).to_dict()
    report(args).input("config", path)
    unknown = sorted(set(c) - CONFIG_FIELDS - CONFIG_IGNORED)
    if unknown:
        raise ValueError(f"{path}: field {unknown[0]!r} is not a larv run config field that "
                         f"larv merge reads ({', '.join(sorted(CONFIG_FIELDS))})")
    mergers, gates = list(c.get("mergers") or []), list(c.get("gates") or [{"gate": "none"}])
    if len(mergers) != 1 or len(gates) != 1:
        raise ValueError(
            f"{args.config}: {len(mergers)} merger(s) x {len(gates)} gate(s); larv merge takes "
            "one of each (larv run runs grids; configs/<model>_<suite>.py:best is one merge)")
    (m,), (g,) = mergers, gates
    if "method" not in m:
        raise ValueError(f"{path}: mergers[0] names no method")
    svc_options = dict(m.get("svc_options") or {})
    extra = sorted(set(svc_options) - {"alpha"})
    if extra:
        raise ValueError(f"{path}: mergers[0].svc_options {extra[0]!r}: larv merge takes "
                         "alpha only (larv run takes exclude and cluster_rtol too)")
    ckpt_dir = args.checkpoint_dir or c.get("checkpoint_dir") or "."
    out: dict[str, Any] = {"method": m["method"], "svc": bool(m.get("svc", False)),
                           "svc_alpha": svc_options.get("alpha"),
                           "larv": g.get("gate", "none"), "larv_apply": g.get("apply", "post")}
    if m.get("svc_order") is not None:
        out["larv_svc_order"] = m["svc_order"]
    if "base" in c:
        out["base"] = resolve_checkpoint(c["base"], ckpt_dir)
    if c.get("models"):
        out["models"] = [resolve_checkpoint(x, ckpt_dir) for x in c["models"]]
    if c.get("granularity") is not None:
        out["larv_granularity"] = c["granularity"]
    names = {"mode": "larv_mode", "base_mode": "larv_base_mode", "seed": "larv_seed",
             "k": "larv_k", "p": "larv_p", "q": "larv_q"}
    diag = dict(c.get("diagnostics") or {})
    unknown = sorted(set(diag) - set(names))
    if unknown:
        raise ValueError(f"{path}: diagnostics.{unknown[0]} is not one of "
                         f"{', '.join(sorted(names))}")
    out.update({names[k]: v for k, v in diag.items()})
    if c.get("out_dir"):
        out["out"] = Path(c["out_dir"])
    if c.get("act"):
        out["act"] = c["act"]
    args.config_options = dict(m.get("options") or {})
    args.config_gate_options = dict(g.get("options") or {})
    return out


def _start_base_cache(base_path: Path, units, lk: dict, act: str):
    """The LARV base cache (r_eff(theta0) and the base Grams, ~2 s for ViT-B/32), started in a
    background thread: it depends on theta0 and the units alone, so its eigenvalue and matrix
    work overlaps the merge's streaming reads. The thread opens its own view of ``base_path``.
    Returns a ``Future`` of ``(base_flat, cache, seconds)``."""
    from concurrent.futures import ThreadPoolExecutor

    def work():
        import time

        import jax

        from larv_jax import diagnostics as dg
        from larv_jax.caches import base_cache_dir
        from larv_jax.checkpoint import load_checkpoint

        t0 = time.perf_counter()
        base_flat = load_checkpoint(base_path, act=act).flat(native=True)
        cache = dg.base_cache(base_flat, units, mode=lk["base_mode"],
                              key=jax.random.PRNGKey(lk["seed"]), store=base_cache_dir())
        jax.block_until_ready([x for x in (*cache.reff, *cache.norm, *cache.gram)
                               if x is not None])
        return base_flat, cache, time.perf_counter() - t0

    pool = ThreadPoolExecutor(1, thread_name_prefix="larv-base-cache")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _prefetched(future) -> tuple | None:
    if future is None:
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 -- recomputed in the caller's thread, which raises it properly
        return None


class MergePlan(NamedTuple):
    """What ``larv merge`` checked and will do (:func:`plan`), executed by :func:`execute`."""
    prepared: Any        # larv_jax.merging.engine.Prepared: opened inputs, paths, hparams
    hparams: dict        # the --scale / --seed / --set options as given (merge_delta's kwargs)
    lk: dict             # larv_kwargs(args)
    larv_on: bool
    needs_diag: bool
    svc_later: bool      # SVC after LARV (--larv-svc-order larv_first)
    shapes: dict         # {path: shape} of the base
    units: Any           # LARV units (None without --larv)
    summary: dict        # the printable / JSON plan


def plan(args: argparse.Namespace) -> MergePlan:
    """Every check the merge makes before its first weight is read, in the real run's order:
    the output path, the method and its options, the LARV flags, the inputs opened (format,
    config, keys, shapes: :func:`larv_jax.merging.engine.prepare`), the LARV units. Raises the
    error the real run would; ``--dry-run`` prints the result and stops."""
    from larv_jax.checkpoint import load_checkpoint
    from larv_jax.cli.flags import check_out, larv_kwargs, parse_key_values
    from larv_jax.larv import schedules
    from larv_jax.merging import engine, registry

    resolve_args(args)
    check_out(args.out, [args.base, *args.models], overwrite=args.overwrite)
    hparams = {**args.config_options, **parse_key_values(args.set)}
    if args.scale is not None:
        hparams["scale"] = args.scale
    if args.seed is not None:
        hparams["key"] = args.seed
    registry.hparams(args.method, hparams)  # a bad option is an error before any input is read
    lk = larv_kwargs(args)
    lk["gate_options"] = {**args.config_gate_options, **lk["gate_options"]}
    larv_on = not schedules.is_identity(lk["gate"], **lk["gate_options"])
    needs_diag = False
    if larv_on:  # the diagnostics only then: a plain merge never imports jax
        from larv_jax.larv import plan as L

        L.check_modes(lk["apply"], lk["svc_order"], args.svc)  # before the (slow) merge
        needs_diag = L.needs_diagnostics(lk["gate"])
    svc_later = larv_on and args.svc and lk["svc_order"] == "larv_first"
    base = load_checkpoint(args.base, act=args.act)
    # fine-tunes share the base's architecture: its activation, unless --act says otherwise
    models = [load_checkpoint(m, act=args.act or base.config.vision.act) for m in args.models]
    prepared = engine.prepare(base, models, args.method, svc=args.svc and not svc_later,
                              svc_alpha=args.svc_alpha, **hparams)
    base = prepared.base
    shapes = {p: tuple(base.shape(p)) for p in base.paths()}
    units = None
    if larv_on:  # the units depend on the base's shapes and the merged leaves alone
        units = L.units_for(shapes, set(prepared.merged), lk["granularity"])
    summary = _summary(args, prepared, shapes, units, larv_on=larv_on, needs_diag=needs_diag)
    return MergePlan(prepared, hparams, lk, larv_on, needs_diag, svc_later, shapes, units,
                     summary)


def _summary(args, prepared, shapes, units, *, larv_on: bool, needs_diag: bool) -> dict:
    """The plan as data: inputs, what is computed, what is written, the memory estimate."""
    import numpy as np

    from larv_jax.cli.common import checkpoint_reads, peak_memory

    k = len(prepared.models)
    size = {p: int(np.prod(s)) for p, s in shapes.items()}
    merged = sum(size[p] for p in prepared.merged)
    copied = sum(size[p] for p in prepared.copied)
    leaf = max((size[p] for p in prepared.merged), default=0)
    parts = {"merged_model_f32": 4 * (merged + copied),
             "one_leaf_task_vectors_f32": 4 * (k + 2) * leaf,
             "serialized_output": 4 * (merged + copied)}
    if larv_on and needs_diag:
        parts["larv_base_f32"] = 4 * (merged + copied)
    computes = [f"{args.method} over K = {k} task vectors, {len(prepared.merged)} leaves "
                f"({merged:,} parameters; {len(prepared.copied)} leaves copied from the base)",
                f"hyperparameters {json.dumps(prepared.hparams, default=repr)}"]
    if args.svc:
        computes.append(f"SVC (alpha {prepared.svc_alpha})" if prepared.svc_alpha is not None
                        else "SVC after LARV (alpha by method)")
    if larv_on:
        computes.append(f"LARV {args.larv} over L = {len(units)} units"
                        + (" (diagnostics e, c; base cache)" if needs_diag else ""))
    computes.append("sha256 of every input file" if not args.no_hash else "no input hashes")
    return {
        "reads": checkpoint_reads([("base", prepared.base)]
                                  + [("model", m) for m in prepared.models]),
        "computes": computes,
        "writes": [str(args.out / n) for n in ("model.safetensors", "config.json",
                                               "merge_report.json")],
        "memory": peak_memory(parts),
    }


def run(args: argparse.Namespace) -> int:
    from larv_jax.cli.common import run_planned

    return run_planned(args, "merge", plan, execute)


def execute(args: argparse.Namespace, p: MergePlan) -> int:
    """The merge itself, on a checked :class:`MergePlan`."""
    import json
    import time

    from larv_jax.checkpoint import save_hf
    from larv_jax.cli.common import report
    from larv_jax.merging import TaskVectors, apply_delta, bind, bind_svc, merge_delta

    rep = report(args)
    lk, larv_on, needs_diag, svc_later = p.lk, p.larv_on, p.needs_diag, p.svc_later
    hparams, shapes, units = p.hparams, p.shapes, p.units
    base, models = p.prepared.base, p.prepared.models
    if larv_on:
        import jax

        from larv_jax import diagnostics as dg
        from larv_jax.caches import base_cache_dir
        from larv_jax.larv import plan as L
    prefetched = None
    if larv_on and needs_diag:
        prefetched = _start_base_cache(args.base, units, lk, base.config.vision.act)
    delta, report_ = merge_delta(base, models, args.method, svc=args.svc and not svc_later,
                                 svc_alpha=args.svc_alpha, hash_inputs=not args.no_hash,
                                 **hparams)
    # LARV veneer (--larv ...): s from (base, delta); theta = theta0 + s * D.
    t0 = time.perf_counter()
    scales = None
    report_["larv"] = None
    if getattr(args, "config", None):
        report_["config"] = args.config
    if larv_on:
        pre = _prefetched(prefetched)
        # the source's memory order, like the merged delta: theta0 + s * D needs no transposes
        base_flat = (pre[0] if pre is not None else base.flat(native=True)) if needs_diag else {}
        cache, cache_s = (pre[1], pre[2]) if pre is not None else (None, None)
        if needs_diag and cache is None:
            cache = dg.base_cache(base_flat, units, mode=lk["base_mode"],
                                  key=jax.random.PRNGKey(lk["seed"]), store=base_cache_dir())
        merge = svc = tau = None
        if lk["apply"] == "pre" or svc_later:  # these re-merge / calibrate through the engine
            merge = bind(args.method, model=base.config.name, **hparams)
            tau = TaskVectors(base, models, list(delta))
            if args.svc:
                svc = bind_svc(args.method, alpha=args.svc_alpha)
        lp = L.plan(base_flat, delta, gate=lk["gate"], units=units, cache=cache,
                    key=jax.random.PRNGKey(lk["seed"]), mode=lk["mode"],
                    diag_options=lk["diag_options"], **lk["gate_options"])
        report_["larv"] = {
            "spec": lk["gate"], "options": lk["gate_options"], "apply": lk["apply"],
            "base_cache_overlapped_s": cache_s,
            "base_cache_source": None if cache is None else cache.source,
            "svc_order": lk["svc_order"] if args.svc else None,
            "granularity": lk["granularity"],
            "diagnostics": None if lp.diagnostics is None else lp.diagnostics.settings,
            "units": [r._asdict() for r in lp.report()]}
        # what L.apply does, in two steps so that the first pass is released before the apply
        delta, scales = L.compose(lp, shapes, delta, apply=lk["apply"], merge=merge, tau=tau,
                                  svc=svc, svc_order=lk["svc_order"])
    report_["timings"]["larv_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = apply_delta(base, delta, scales=scales, consume=True, inplace=True)
    report_["timings"]["apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = json.dumps(report_, indent=2) + "\n"
    save_hf(params, base.config, args.out, overwrite=args.overwrite,
            extra_files={"merge_report.json": text})
    save_s = time.perf_counter() - t0
    for role, entries in (("base", [report_["inputs"]["base"]]),
                          ("model", report_["inputs"]["models"])):
        for d in entries:
            for f in d["files"]:
                rep.input(role, f["file"], sha256=f["sha256"])
    rep.output(args.out)
    rep.timings.update(report_["timings"], save_s=save_s)
    rep.results.update(method=args.method, num_tasks=len(models),
                       hparams=report_["hparams"], svc=report_["svc"],
                       merged_params=report_["merged_params"],
                       larv=None if report_["larv"] is None else {
                           "spec": lk["gate"], "units": len(report_["larv"]["units"]),
                           "s": [u.get("s") for u in report_["larv"]["units"]]})
    print(f"wrote {args.out} ({args.method}, K={len(models)}, merge "
          f"{report_['timings']['merge_s']:.1f}s, save {save_s:.1f}s)")
    return 0
