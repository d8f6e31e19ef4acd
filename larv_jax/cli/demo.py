"""``larv demo``: the whole LARV pipeline on the offline zoo, end to end, in one command.

1. builds the zoo (``larv zoo build``) or reuses it: a tiny CLIP pretrained on procedural captioned
   images and its vision tower fine-tuned on 8 tasks, as Hugging Face checkpoints + TFDS datasets;
2. loads the checkpoints through ``larv_jax.checkpoint`` and forms the task vectors;
3. runs every base merger of ``larv_jax.merging.METHODS`` plain, with LARV (tiered and continuous
   gates) and with the depth-only schedules (linear, tier2/3/6/12), one grid
   (``larv_jax.larv.grid.run_grid``; each merger's delta and diagnostics computed once), plus a
   control beside each gate: a uniform scale equal to the mean of that gate's scales
   (``matched_uniform(tiered)``, ``matched_uniform(continuous)``), which separates what the
   gate's depth profile does from what its overall shrinking or growing does; and Task
   Arithmetic over lambda = 0.1 .. 1.0, plain and with the tiered gate;
4. evaluates every merged model on the zoo tasks' test splits through ``larv_jax.eval.evaluate``
   (zero-shot heads from the pretrained text tower, logits = 100 cos);
5. writes ``table.md`` (LARV paper Table 1 shape: methods x tasks + average, LARV gains in
   parentheses, plus an average-accuracy table over the schedules), ``results.jsonl`` (one row per
   cell: scales, per-unit e/c/s, accuracies), ``summary.json``, ``plots/diagnostics_<merger>.png``
   (e, c and the tiered s against depth, the paper's Figure 2) and ``plots/lambda_ta.png``
   (accuracy against Task Arithmetic's lambda, with and without LARV), and prints a
   plain-language summary of what the table shows.

``--seeds 0,1,2`` runs all of this once per seed (one zoo each) and adds ``seeds.md`` /
``seeds.json``: every merger x veneer with the mean and sd over seeds of its average accuracy and
of its gain over the plain merger, how many seeds improve, and the matched-uniform control.

``--quick`` runs the same pipeline on the quick zoo with two mergers and one schedule (seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("results/demo")
DEFAULT_OUT_QUICK = Path("results/demo-quick")


def add_parser(sub) -> None:
    from larv_jax.cli.common import add_common_arguments, add_output_arguments

    p = sub.add_parser("demo", help="the end-to-end LARV benchmark on the offline zoo",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, default=None,
                   help="zoo directory: used as it is when it holds a zoo, built there "
                        "otherwise (default: results/zoo, or results/zoo-quick with --quick, "
                        "built, or rebuilt when its seed or spec is stale)")
    p.add_argument("--quick", action="store_true",
                   help="quick zoo, 2 mergers (task_arithmetic, ties), 1 schedule (default: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="zoo seed; also keys DARE and the randomized SVD (default: 0)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds for the seed study (e.g. 0,1,2): one zoo per seed "
                        "(seed 0 in the --zoo directory, seed N in <zoo>-seedN), every cell per "
                        "seed under <out>/seed<N>/, and seeds.md / seeds.json: mean and sd over "
                        "seeds of each cell's accuracy and gain (default: --seed alone)")
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
    add_common_arguments(p)
    add_output_arguments(p, help=f"results directory (default: {DEFAULT_OUT}, or "
                                 f"{DEFAULT_OUT_QUICK} with --quick)",
                         overwrite_help="replace --out even when it is not a previous demo "
                                        "output (default: replace a previous demo output only)")


def _names(value: str | None, default) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    return tuple(s.strip() for s in value.split(",") if s.strip())


def _check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse to replace a directory that is not a previous demo output (unless ``overwrite``)."""
    if not overwrite and out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            (out / "results.jsonl").exists() or (out / "table.md").exists()))):
        raise FileExistsError(f"{out} exists and is not a larv demo output (no results.jsonl); "
                              "pick another --out, or pass --overwrite to replace it")


def _seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds 0,1,2`` (every item a distinct non-negative integer) or ``--seed N``."""
    from larv_jax.zoo.build import check_seed

    if args.seeds is None:
        return [check_seed(args.seed)]
    items = [s.strip() for s in args.seeds.split(",")]
    if not all(s.isdigit() for s in items):
        raise ValueError(f"--seeds must be comma-separated non-negative integers; got "
                         f"{args.seeds!r}")
    seeds = [int(s) for s in items]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers; got {args.seeds!r}")
    return seeds


def seed_zoo_dir(root: Path, seed: int) -> Path:
    """Seed 0's zoo is ``root`` itself (what `larv demo` builds); seed N's is ``<root>-seedN``."""
    return root if seed == 0 else root.with_name(f"{root.name}-seed{seed}")


def run(args: argparse.Namespace) -> int:
    import time

    from larv_jax import merging
    from larv_jax.cli.common import report as cli_report
    from larv_jax.cli.flags import check_out
    from larv_jax.cli.zoo import default_zoo_dir
    from larv_jax.io import atomic_path
    from larv_jax.larv import schedules as larv_schedules
    from larv_jax.zoo import report

    t_start = time.perf_counter()
    quick = args.quick
    seeds = _seeds(args)
    zoo_root = args.zoo or default_zoo_dir(quick)
    out = args.out or (DEFAULT_OUT_QUICK if quick else DEFAULT_OUT)
    methods = _names(args.methods, report.QUICK_METHODS if quick else merging.METHODS)
    schedules = _names(args.schedules, report.QUICK_SCHEDULES if quick else report.SCHEDULES)
    for m in methods:
        merging.get_method(m)
    for s in schedules:
        larv_schedules.parse_spec(s)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    check_out(out, [seed_zoo_dir(zoo_root, s) for s in seeds], overwrite=True)  # never a zoo
    _check_out(out, args.overwrite)
    rep = cli_report(args)

    results = {}
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            print(f"=== seed {seed} ({i + 1}/{len(seeds)}) ===")
        results[seed] = _run_seed(args, seed=seed, zoo_dir=seed_zoo_dir(zoo_root, seed),
                                  methods=methods, schedules=schedules)
    print(f"writing {out}")
    with atomic_path(out, is_dir=True) as tmp:
        if len(seeds) == 1:
            _write_seed(tmp, results[seeds[0]])
        else:
            for seed in seeds:
                (tmp / f"seed{seed}").mkdir()
                _write_seed(tmp / f"seed{seed}", results[seed])
            study = _write_study(tmp, results)
    for seed in seeds:
        r = results[seed]
        print(f"\n## seed {seed}\n\n{r['main']}\n\n{r['sched']}\n\n{r['lambda_table']}")
    if len(seeds) == 1:
        text = results[seeds[0]]["plain_summary"]
    else:
        print(f"\n## over seeds {','.join(map(str, seeds))}\n\n{study['table']}")
        text = report.study_summary(study["entries"], seeds, results)
    print("\n## Summary\n\n" + text)
    print(f"\nwrote {out}/ ({time.perf_counter() - t_start:.0f} s)")
    rep.output(out)
    for seed in seeds:
        r = results[seed]
        rep.input("zoo", r["zoo_dir"])
        rep.timings.update({f"seed{seed}_{k}_s": v for k, v in r["seconds"].items()})
    rep.results.update(seeds=seeds, per_seed={s: _headline(results[s]) for s in seeds})
    return 0


def _headline(r: dict) -> dict:
    """One seed's headline numbers: reference averages, each cell's average top-1 and the LARV
    gains (what table.md and summary.json show)."""
    return {"pretrained_average": r["pretrained"][-1], "individual_average": r["individual"][-1],
            "cells": [{"merger": x["merger"], "gate": x["gate"],
                       "average_top1": x["eval"]["average"]} for x in r["rows"]],
            "larv_gain": r["summary"]}


def _run_seed(args: argparse.Namespace, *, seed: int, zoo_dir: Path, methods, schedules) -> dict:
    """Build or reuse one seed's zoo, evaluate the reference rows, run the grid, the matched
    controls and the lambda sweep; everything the seed's files and the study need."""
    import time

    import numpy as np

    from larv_jax import diagnostics as dg
    from larv_jax import merging
    from larv_jax.checkpoint import load_params
    from larv_jax.eval import evaluate, zero_shot_head
    from larv_jax.eval.data import open_source
    from larv_jax.larv.grid import run_grid
    from larv_jax.merging import task_vectors
    from larv_jax.models.tokenizer import load_tokenizer
    from larv_jax.tree import flatten, unflatten
    from larv_jax.zoo import build_zoo, open_zoo, report

    t_start = time.perf_counter()
    progress = not args.no_progress
    quick = args.quick
    print(f"[1/5] zoo: {zoo_dir}")
    if args.zoo is not None and (zoo_dir / "manifest.json").exists():
        zoo = open_zoo(zoo_dir)  # an explicit zoo is used as it is, whatever spec built it
        print(f"using the zoo in {zoo_dir} (seed {zoo.manifest['seed']}, spec "
              f"{zoo.manifest['spec_hash']}); `larv zoo build --force` rebuilds it")
    else:
        build_zoo(zoo_dir, seed=seed, quick=quick, progress=progress, log=print)
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
    # Each test split is read and decoded from its TFDS files once, then kept in memory: the grid
    # evaluates ~120 models on the same images (the per-example preparation still runs per model,
    # through the same larv_jax.eval pipeline as `larv eval`).
    sources = {}
    for t in tasks:
        src = open_source(t, data_dir)
        sources[t.name] = [src[i] for i in range(len(src))]
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
    lambdas = report.QUICK_LAMBDAS if quick else report.LAMBDAS
    print(f"[4/5] grid: {len(mergers_)} mergers x {len(gates)} veneers "
          f"({', '.join(g['name'] for g in gates)}) over {len(names)} tasks, the matched "
          f"uniform controls, and Task Arithmetic at {len(lambdas)} lambdas with and without "
          "LARV (tiered)")
    diags: dict[str, dg.Diagnostics] = {}
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mergers_) * len(gates), desc="merge + evaluate", unit="model")
    model_name = config.name

    def resolve(method, **options):
        return merging.bind(method, model=model_name, **options)

    def grid(mergers__, gates_, **kw):
        for row in run_grid(base=base_flat, tau=tau, mergers=mergers__, gates=gates_,
                            resolve_merger=resolve, seed=seed, diag_mode=args.diag_mode,
                            evaluate=lambda p: eval_on(unflatten(p), tasks), **kw):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(last=f"{row['merger']}/{row['gate']}: "
                                     f"{100 * row['eval']['average']:.1f}")
            yield row

    rows.extend(grid(mergers_, gates,
                     on_diagnostics=lambda label, d: diags.__setitem__(label, d)))
    # Controls: every base merger under a uniform scale equal to the mean of each LARV gate's
    # scales (what the gate does to the update's overall size, without its depth profile).
    # One grid per merger holds both of its controls, so its delta is merged once more, not twice.
    controls = []
    for m in mergers_:
        gates_m = []
        for gate in report.LARV_GATES:
            cell = next((r for r in rows if r["merger"] == m["name"] and r["gate"] == gate), None)
            if cell is not None:
                mean_s = float(np.mean(cell["s"]))
                gates_m.append({"gate": f"uniform({mean_s:.4f})",
                                "name": report.matched_name(gate)})
        if gates_m:
            controls.append((m, gates_m))
    sweep = [{"name": report.lambda_label(lam), "method": "task_arithmetic",
              "options": {"scale": lam}} for lam in lambdas]
    sweep_gates = [{"gate": "none", "name": "none"}, {"gate": "tiered", "name": "tiered"}]
    if bar is not None:
        bar.total += sum(len(g) for _, g in controls) + len(sweep) * len(sweep_gates)
        bar.refresh()
    for m, gates_m in controls:
        rows.extend(grid([m], gates_m))
    lam_rows = list(grid(sweep, sweep_gates))
    if bar is not None:
        bar.close()
    order = {m["name"]: i for i, m in enumerate(mergers_)}
    rows.sort(key=lambda r: order[r["merger"]])  # stable: each merger's veneers stay in order
    t_grid = time.perf_counter()

    main = report.main_table(rows, names, pretrained=pretrained, individual=individual)
    sched = report.schedule_table(rows, names)
    return {
        "seed": seed, "quick": quick, "zoo_dir": zoo_dir, "zoo": zoo, "config": config,
        "names": names, "rows": rows, "lam_rows": lam_rows, "diags": diags,
        "pretrained": pretrained, "individual": individual, "diag_mode": args.diag_mode,
        "methods": list(methods), "veneers": [g["name"] for g in gates],
        "main": main, "sched": sched, "summary": report.larv_summary(rows, names),
        "lambda_table": report.lambda_table(lam_rows, names),
        "plain_summary": report.plain_summary(rows, names, pretrained=pretrained,
                                              individual=individual, lam_rows=lam_rows),
        "seconds": {"zoo": round(t_zoo, 1), "load_and_reference_rows": round(t_ref - t_start - t_zoo, 1),
                    "grid": round(t_grid - t_ref, 1), "total": round(t_grid - t_start, 1)},
        "zoo_seconds": zoo.manifest.get("timings_s", {}),
    }


def _write_seed(out: Path, r: dict) -> None:
    """One seed's files: table.md, results.jsonl, lambda.jsonl, summary.json, plots/."""
    import json

    from larv_jax import diagnostics as dg
    from larv_jax.io import json_default
    from larv_jax.zoo import report

    rows, names, config = r["rows"], r["names"], r["config"]
    lines = [
        f"# larv demo ({'quick' if r['quick'] else 'full'} zoo, seed {r['seed']})", "",
        f"Zoo: `{r['zoo_dir']}` ({config.name}: {config.vision.layers} blocks, width "
        f"{config.vision.width}, patch {config.vision.patch_size}, {len(names)} tasks; "
        f"LARV units L = {len(rows[0]['s']) if rows else 0}). Top-1 (%) on each task's test split "
        "through `larv_jax.eval.evaluate`; LARV rows: gain over the base merger in parentheses.",
        f"LARV diagnostics: r_eff(theta0) exact, r_eff(D) {r['diag_mode']}; module units.",
        "", r["main"], "",
        "## Average top-1 (%) per veneer: none, LARV gates, depth-only schedules, and the "
        "matched-uniform controls (a uniform scale equal to the mean s of each gate)", "",
        r["sched"], "",
        "## LARV gain over the base merger (average top-1, points)", "",
        "| veneer | mean | min | max | mergers improved |", "|---|---:|---:|---:|---:|",
        *[f"| {g} | {100 * v['mean_gain']:+.2f} | {100 * v['min_gain']:+.2f} | "
          f"{100 * v['max_gain']:+.2f} | {v['improved']}/{v['mergers']} |"
          for g, v in r["summary"].items()], "",
        "## Task Arithmetic against its coefficient lambda (average top-1, %)", "",
        r["lambda_table"], "",
        "## Summary", "",
        r["plain_summary"], "",
    ]
    (out / "plots").mkdir()
    for label, diag in r["diags"].items():
        tiered = next((x for x in rows if x["merger"] == label and x["gate"] == "tiered"), None)
        s = tiered["s"] if tiered is not None else None
        dg.plot(diag, out / "plots" / f"diagnostics_{label}.png", s=s,
                title=f"{report.DISPLAY.get(label, label)}: e, c and tiered s against depth")
        dg.to_json(diag, out / "plots" / f"diagnostics_{label}.json", s=s)
    report.plot_lambda(r["lam_rows"], names, out / "plots" / "lambda_ta.png",
                       title=f"Task Arithmetic on the zoo (seed {r['seed']}): accuracy "
                             "against lambda")
    (out / "table.md").write_text("\n".join(lines))
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=json_default) + "\n")
    with open(out / "lambda.jsonl", "w") as f:
        for row in r["lam_rows"]:
            f.write(json.dumps(row, default=json_default) + "\n")
    (out / "summary.json").write_text(json.dumps({
        "zoo": str(r["zoo_dir"]), "seed": r["seed"], "quick": r["quick"], "tasks": names,
        "methods": r["methods"], "veneers": r["veneers"],
        "pretrained": dict(zip([*names, "average"], r["pretrained"], strict=True)),
        "individual": dict(zip([*names, "average"], r["individual"], strict=True)),
        "zoo_manifest_tasks": r["zoo"].manifest["tasks"], "larv_gain": r["summary"],
        "lambda": report.lambda_curves(r["lam_rows"], names),
        "seconds": r["seconds"], "zoo_build_seconds": r["zoo_seconds"],
    }, indent=2, default=json_default) + "\n")


def _write_study(out: Path, results: dict) -> dict:
    """seeds.md and seeds.json of the seed study (``larv_jax.zoo.seeds``)."""
    import json

    from larv_jax.io import json_default
    from larv_jax.zoo import report
    from larv_jax.zoo import seeds as seed_study

    seeds = list(results)
    matched = {g: report.matched_name(g) for g in report.LARV_GATES}
    entries = seed_study.aggregate({s: results[s]["rows"] for s in seeds},
                                   {s: results[s]["names"] for s in seeds},
                                   gates=report.LARV_GATES, matched=matched)
    lam_entries = seed_study.aggregate({s: results[s]["lam_rows"] for s in seeds},
                                       {s: results[s]["names"] for s in seeds},
                                       gates=(), matched={})
    tbl = seed_study.table(entries, display=report.DISPLAY)
    refs = {k: seed_study.stats([results[s][k][-1] for s in seeds])
            for k in ("pretrained", "individual")}
    lines = [
        f"# larv demo seed study (seeds {', '.join(map(str, seeds))}; "
        f"{'quick' if results[seeds[0]]['quick'] else 'full'} zoo, one zoo per seed)", "",
        "Average top-1 (%) over the zoo's tasks: mean ± sample sd over seeds. Gain: the veneer "
        "minus the plain merger of the same seed. A gain exceeds its spread when |mean| > sd and "
        "every seed has the same sign. Matched uniform: one uniform scale equal to the mean of "
        "the gate's scales (the gate's overall shrink or growth without its depth profile); "
        "Gate - matched: what the depth profile adds.", "",
        f"Pretrained (zero-shot): {seed_study.pm(refs['pretrained'], signed=False)}; "
        f"individual fine-tuned: {seed_study.pm(refs['individual'], signed=False)}.", "",
        tbl, "",
        "## Task Arithmetic against lambda (plain and LARV tiered)", "",
        seed_study.table(lam_entries), "",
        "## Summary", "", report.study_summary(entries, seeds, results), "",
    ]
    (out / "seeds.md").write_text("\n".join(lines))
    (out / "seeds.json").write_text(json.dumps({
        "seeds": seeds, "reference": refs, "entries": entries, "lambda": lam_entries,
        "veneers": seed_study.veneer_summary(entries),
    }, indent=2, default=json_default) + "\n")
    return {"table": tbl, "entries": entries}
