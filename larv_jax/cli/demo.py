"""``larv demo``: the whole LARV pipeline on the offline zoo, end to end, in one command.

1. builds the zoo (``larv zoo build``) or reuses it: a tiny CLIP pretrained on procedural captioned
   images and its vision tower fine-tuned on 8 tasks, as Hugging Face checkpoints + TFDS datasets;
2. loads the checkpoints through ``larv_jax.checkpoint`` and forms the task vectors;
3. runs every base merger of ``larv_jax.merging.METHODS`` plain, with LARV (tiered and continuous
   gates) and with the depth-only schedules (linear, tier2/3/6/12), one grid
   (``larv_jax.larv.grid.run_grid``; each merger's delta and diagnostics computed once), plus a
   control: a uniform scale equal to the mean of the continuous gate's scales
   (``matched_uniform``), which separates what the gate's depth profile does from what its
   overall shrinking or growing does;
4. evaluates every merged model on the zoo tasks' test splits through ``larv_jax.eval.evaluate``
   (zero-shot heads from the pretrained text tower, logits = 100 cos);
5. writes ``table.md`` (LARV paper Table 1 shape: methods x tasks + average, LARV gains in
   parentheses, plus an average-accuracy table over the schedules), ``results.jsonl`` (one row per
   cell: scales, per-unit e/c/s, accuracies), ``summary.json`` and ``plots/diagnostics_<merger>.png``
   (e, c and the tiered s against depth, the paper's Figure 2).

``--quick`` runs the same pipeline on the quick zoo with two mergers and one schedule (seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("results/demo")
DEFAULT_OUT_QUICK = Path("results/demo-quick")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the end-to-end LARV benchmark on the offline zoo",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=None,
                   help="zoo directory: used as it is when it holds a zoo, built there "
                        "otherwise (default: results/zoo, or results/zoo-quick with --quick, "
                        "built, or rebuilt when its seed or spec is stale)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results directory (default: {DEFAULT_OUT}, or {DEFAULT_OUT_QUICK} with "
                        "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="quick zoo, 2 mergers (task_arithmetic, ties), 1 schedule (default: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="zoo seed; also keys DARE and the randomized SVD (default: 0)")
    p.add_argument("--methods", default=None,
                   help="comma-separated merging registry names (default: every method; "
                        "task_arithmetic,ties with --quick)")
    p.add_argument("--schedules", default=None,
                   help="comma-separated depth-only schedules, '' for none (default: "
                        "linear,tier2,tier3,tier6,tier12; linear with --quick)")
    p.add_argument("--diag-mode", choices=("exact", "randomized"), default="exact",
                   help="r_eff of the merged update: exact (all singular values; the zoo's "
                        "matrices are at most 64 wide, narrower than the randomized sketch's "
                        "k + p = 74 columns) or randomized (SPEC default for full-size models) "
                        "(default: exact)")
    p.add_argument("--batch-size", type=int, default=250,
                   help="evaluation batch size (default: 250)")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (default: bars on)")


def _names(value: str | None, default) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    return tuple(s.strip() for s in value.split(",") if s.strip())


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not a previous demo output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / "results.jsonl").exists() or (out / "table.md").exists()))):
        raise FileExistsError(f"{out} exists and is not a larv demo output (no results.jsonl); "
                              "pick another --out or remove it")


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import numpy as np

    from larv_jax import diagnostics as dg
    from larv_jax import merging
    from larv_jax.checkpoint import load_params
    from larv_jax.cli.zoo import default_zoo_dir
    from larv_jax.eval import evaluate, zero_shot_head
    from larv_jax.eval.data import open_source
    from larv_jax.io import atomic_path, json_default
    from larv_jax.larv import schedules as larv_schedules
    from larv_jax.larv.grid import run_grid
    from larv_jax.merging import task_vectors
    from larv_jax.models.tokenizer import load_tokenizer
    from larv_jax.tree import flatten, unflatten
    from larv_jax.zoo import build_zoo, open_zoo, report

    t_start = time.perf_counter()
    progress = not args.no_progress
    quick = args.quick
    zoo_dir = args.zoo or default_zoo_dir(quick)
    out = args.out or (DEFAULT_OUT_QUICK if quick else DEFAULT_OUT)
    methods = _names(args.methods, report.QUICK_METHODS if quick else merging.METHODS)
    schedules = _names(args.schedules, report.QUICK_SCHEDULES if quick else report.SCHEDULES)
    for m in methods:
        merging.get_method(m)
    for s in schedules:
        larv_schedules.parse_spec(s)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    _check_out(out)

    print(f"[1/5] zoo: {zoo_dir}")
    if args.zoo is not None and (args.zoo / "manifest.json").exists():
        zoo = open_zoo(zoo_dir)  # an explicit zoo is used as it is, whatever spec built it
        print(f"using the zoo in {zoo_dir} (seed {zoo.manifest['seed']}, spec "
              f"{zoo.manifest['spec_hash']}); `larv zoo build --force` rebuilds it")
    else:
        build_zoo(zoo_dir, seed=args.seed, quick=quick, progress=progress, log=print)
        zoo = open_zoo(zoo_dir)
    t_zoo = time.perf_counter() - t_start

    print("[2/5] loading checkpoints, task vectors, zero-shot heads")
    config, clip_params = load_params(zoo.pretrained)
    tokenizer = load_tokenizer(zoo.pretrained, config.text.context_length)
    names = list(zoo.task_names)
    finetuned = {t: load_params(p)[1] for t, p in zoo.finetuned.items()}
    base_flat = flatten(clip_params)
    tau = task_vectors(base_flat, [flatten(finetuned[t]) for t in names])
    tasks = zoo.eval_tasks()
    data_dir = str(zoo.data_dir)
    sources = {t.name: open_source(t, data_dir) for t in tasks}
    heads = {t.name: zero_shot_head(clip_params, config, tokenizer, t.classnames, t.templates)
             for t in tasks}

    def eval_on(params, task_list):
        res = evaluate(params, clip_params, config, task_list, data_dir, heads=heads,
                       sources=sources, batch_size=args.batch_size, num_threads=2)
        return {"tasks": {k: {"top1": v["top1"], "n": v["n"]} for k, v in res["tasks"].items()},
                "average": res["average"]}

    print("[3/5] reference rows: pretrained (zero-shot) and individual fine-tuned models")
    pre = eval_on(clip_params, tasks)
    pretrained = [pre["tasks"][t]["top1"] for t in names]
    pretrained.append(float(np.mean(pretrained)))
    individual = []
    for task in tasks:
        r = eval_on(finetuned[task.name], [task])
        individual.append(r["tasks"][task.name]["top1"])
    individual.append(float(np.mean(individual)))

    t_ref = time.perf_counter()
    mergers_, gates = report.grid(methods, schedules)
    print(f"[4/5] grid: {len(mergers_)} mergers x {len(gates)} veneers "
          f"({', '.join(g['name'] for g in gates)}) over {len(names)} tasks")
    diags: dict[str, dg.Diagnostics] = {}
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mergers_) * len(gates), desc="merge + evaluate", unit="model")
    model_name = config.name

    def resolve(method, **options):
        return merging.bind(method, model=model_name, **options)

    for row in run_grid(base=base_flat, tau=tau, mergers=mergers_, gates=gates,
                        resolve_merger=resolve, seed=args.seed, diag_mode=args.diag_mode,
                        evaluate=lambda p: eval_on(unflatten(p), tasks),
                        on_diagnostics=lambda label, d: diags.__setitem__(label, d)):
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{row['merger']}/{row['gate']}: "
                                 f"{100 * row['eval']['average']:.1f}")
    # Control: every base merger under a uniform scale equal to the mean of its continuous-gate
    # scales (what the continuous gate does to the update's overall size, without the shape).
    controls = []
    for m in mergers_:
        cont = next((r for r in rows if r["merger"] == m["name"] and r["gate"] == "continuous"),
                    None)
        if cont is not None:
            mean_s = float(np.mean(cont["s"]))
            controls.append((m, {"gate": f"uniform({mean_s:.4f})", "name": report.MATCHED}))
    if bar is not None:
        bar.total += len(controls)
    for m, g in controls:
        for row in run_grid(base=base_flat, tau=tau, mergers=[m], gates=[g],
                            resolve_merger=resolve, seed=args.seed, diag_mode=args.diag_mode,
                            evaluate=lambda p: eval_on(unflatten(p), tasks)):
            rows.append(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    order = {m["name"]: i for i, m in enumerate(mergers_)}
    rows.sort(key=lambda r: order[r["merger"]])  # stable: each merger's veneers stay in order

    t_grid = time.perf_counter()
    print(f"[5/5] writing {out}")
    main = report.main_table(rows, names, pretrained=pretrained, individual=individual)
    sched = report.schedule_table(rows, names)
    summary = report.larv_summary(rows, names)
    manifest = zoo.manifest
    lines = [
        f"# larv demo ({'quick' if quick else 'full'} zoo, seed {args.seed})", "",
        f"Zoo: `{zoo_dir}` ({config.name}: {config.vision.layers} blocks, width "
        f"{config.vision.width}, patch {config.vision.patch_size}, {len(names)} tasks; "
        f"LARV units L = {len(rows[0]['s']) if rows else 0}). Top-1 (%) on each task's test split "
        "through `larv_jax.eval.evaluate`; LARV rows: gain over the base merger in parentheses.",
        f"LARV diagnostics: r_eff(theta0) exact, r_eff(D) {args.diag_mode}; module units.",
        "", main, "",
        "## Average top-1 (%) per veneer: none, LARV gates, depth-only schedules, and "
        "`matched_uniform` (a uniform scale equal to the mean continuous-gate s)", "", sched, "",
        "## LARV gain over the base merger (average top-1, points)", "",
        "| veneer | mean | min | max | mergers improved |", "|---|---:|---:|---:|---:|",
        *[f"| {g} | {100 * v['mean_gain']:+.2f} | {100 * v['min_gain']:+.2f} | "
          f"{100 * v['max_gain']:+.2f} | {v['improved']}/{v['mergers']} |"
          for g, v in summary.items()], "",
    ]
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "plots").mkdir()
        for label, diag in diags.items():
            tiered = next((r for r in rows if r["merger"] == label and r["gate"] == "tiered"), None)
            s = tiered["s"] if tiered is not None else None
            dg.plot(diag, tmp / "plots" / f"diagnostics_{label}.png", s=s,
                    title=f"{report.DISPLAY.get(label, label)}: e, c and tiered s against depth")
            dg.to_json(diag, tmp / "plots" / f"diagnostics_{label}.json", s=s)
        (tmp / "table.md").write_text("\n".join(lines))
        with open(tmp / "results.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=json_default) + "\n")
        (tmp / "summary.json").write_text(json.dumps({
            "zoo": str(zoo_dir), "seed": args.seed, "quick": quick, "tasks": names,
            "methods": list(methods), "veneers": [g["name"] for g in gates],
            "pretrained": dict(zip([*names, "average"], pretrained, strict=True)),
            "individual": dict(zip([*names, "average"], individual, strict=True)),
            "zoo_manifest_tasks": manifest["tasks"], "larv_gain": summary,
            "seconds": {"zoo": round(t_zoo, 1),
                        "load_and_reference_rows": round(t_ref - t_start - t_zoo, 1),
                        "grid": round(t_grid - t_ref, 1),
                        "total": round(time.perf_counter() - t_start, 1)},
        }, indent=2, default=json_default) + "\n")
    print()
    print(main)
    print()
    print(sched)
    print(f"\nwrote {out}/table.md, results.jsonl, summary.json, plots/ "
          f"({time.perf_counter() - t_start:.0f} s)")
    return 0
