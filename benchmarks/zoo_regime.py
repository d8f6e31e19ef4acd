"""Where the zoo's merge problem sits: zero-shot, fine-tuned and Task Arithmetic accuracy, and the
task vectors' geometry (relative norms, cross-task cosines by depth), for one zoo recipe.

The zoo is only evidence about LARV if merging it behaves like merging real CLIP fine-tunes
(``../shared/ZOO-REGIME.md``): fine-tuned well above zero-shot, Task Arithmetic well above
zero-shot and well below fine-tuned. This script trains a zoo in memory (``train_zoo``, nothing
written) with spec overrides and appends one JSON line per run to
``benchmarks/results/zoo_regime.jsonl``::

    python benchmarks/zoo_regime.py --seed 0 --set finetune_lr=1e-4 --set finetune_steps=400

It never looks at LARV: the regime criteria (issue 14) are the only targets of a recipe.

``--zoo DIR`` instead reads a built zoo (``larv zoo build``, ``larv demo``) and prints its task
vectors' geometry as markdown: relative norms per task and cross-task cosines per block (the
README's table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "zoo_regime.jsonl"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(s for s in text.split(",") if s)
    return text


def geometry(base: dict, finetuned: dict[str, dict]) -> dict:
    """Relative norms ||tau_k|| / ||theta0|| over the vision tower, and the mean / max absolute
    cross-task cosine of the task vectors per block and for the whole tower."""
    from larv_jax.tree import flatten

    b = flatten(base)
    names = list(finetuned)
    taus = {n: {k: np.asarray(v, np.float64) - np.asarray(b[k], np.float64)
                for k, v in flatten(finetuned[n]).items()} for n in names}
    keys = sorted(next(iter(taus.values())))
    base_norm = np.sqrt(sum(np.sum(np.asarray(b[k], np.float64) ** 2) for k in keys))
    rel = {n: float(np.sqrt(sum(np.sum(t[k] ** 2) for k in keys)) / base_norm)
           for n, t in taus.items()}

    def cosines(select):
        vecs = np.stack([np.concatenate([select(t[k], k) for k in keys]) for t in taus.values()])
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-30)
        g = vecs @ vecs.T
        off = g[~np.eye(len(names), dtype=bool)]
        return {"mean": float(np.mean(off)), "mean_abs": float(np.mean(np.abs(off))),
                "max_abs": float(np.max(np.abs(off)))}

    stacked = [k for k in keys if "/resblocks/" in k]
    depth = int(np.asarray(b[stacked[0]]).shape[0]) if stacked else 0
    by_block = []
    for layer in range(depth):
        by_block.append(cosines(lambda t, k, i=layer: t[i].ravel() if "/resblocks/" in k
                                else np.zeros(0)))
    return {"rel_norm": rel, "rel_norm_mean": float(np.mean(list(rel.values()))),
            "cosine_all": cosines(lambda t, k: t.ravel()), "cosine_by_block": by_block}


class _Scorer:
    """Top-1 of any vision tower on the in-memory zoo's test splits, heads built once."""

    def __init__(self, state):
        from larv_jax.eval.heads import zero_shot_head
        from larv_jax.models.tokenizer import CLIPTokenizer
        from larv_jax.zoo import train
        from larv_jax.zoo.tasks import ZOO_TASKS

        self.state, self.train = state, train
        self.base = train.vision_tree(state.params)
        self.proj = state.params["visual"]["proj"]["kernel"]
        tokenizer = CLIPTokenizer(state.tokenizer, state.spec.context_length)
        self.heads = {n: zero_shot_head(state.params, state.config, tokenizer,
                                        ZOO_TASKS[n].classnames, ZOO_TASKS[n].templates)
                      for n in state.spec.tasks}

    def top1(self, params, name: str) -> float:
        x, y = self.state.data[name]["test"]
        return self.train.accuracy(params, config=self.state.config, proj=self.proj,
                                   head=self.heads[name], images=x, labels=y)


def _plus(base, lam: float, *taus):
    """theta0 + lam * sum(taus) in float64, rounded once to float32."""
    import jax

    return jax.tree.map(lambda b, *ts: (np.asarray(b, np.float64) + lam * sum(ts)
                                        ).astype(np.float32), base, *taus)


def task_vectors_of(scorer: _Scorer) -> dict:
    import jax

    return {n: jax.tree.map(lambda f, b: np.asarray(f, np.float64) - np.asarray(b, np.float64),
                            ft, scorer.base) for n, ft in scorer.state.finetuned.items()}


def task_arithmetic_accuracy(scorer: _Scorer, lams) -> dict:
    """Per-task top-1 of theta0 + lam * sum_k tau_k for each ``lam`` (in memory)."""
    taus = list(task_vectors_of(scorer).values())
    return {f"{lam:g}": {n: scorer.top1(_plus(scorer.base, lam, *taus), n)
                         for n in scorer.state.spec.tasks} for lam in lams}


def interference(scorer: _Scorer, lam: float = 0.3) -> dict:
    """Per task k at ``lam``: top-1 of theta0 + lam tau_k (its own vector alone) and of
    theta0 + lam sum_{j != k} tau_j (the others' vectors alone): which side of TA's loss is it?"""
    taus = task_vectors_of(scorer)
    out = {}
    for name in scorer.state.spec.tasks:
        others = [t for n, t in taus.items() if n != name]
        rest = _plus(scorer.base, lam, *others) if others else scorer.base
        out[name] = {"own": scorer.top1(_plus(scorer.base, lam, taus[name]), name),
                     "others": scorer.top1(rest, name)}
    return out


def cached_pretraining(cache_dir: Path):
    """Wrap ``larv_jax.zoo.train.pretrain`` with an on-disk cache keyed by every input (so a
    sweep over fine-tuning recipes pays the pretraining once)."""
    import hashlib
    import pickle

    from larv_jax.zoo import train

    inner = train.pretrain

    def pretrain(params, **kw):
        h = hashlib.sha256()
        for k in sorted(kw):
            v = kw[k]
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray)
                     else repr(v).encode())
        path = cache_dir / f"pretrain-{h.hexdigest()[:20]}.pkl"
        if path.exists():
            print(f"pretraining from cache {path}")
            return pickle.loads(path.read_bytes())
        out = inner(params, **kw)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(out))
        return out

    train.pretrain = pretrain


def geometry_of_zoo(root: Path) -> dict:
    """:func:`geometry` of a built zoo's checkpoints (vision tower, without the projection)."""
    from larv_jax.checkpoint import load_params
    from larv_jax.zoo import open_zoo, train

    zoo = open_zoo(root)
    _, params = load_params(zoo.pretrained)
    finetuned = {t: load_params(p)[1] for t, p in zoo.finetuned.items()}
    return geometry(train.vision_tree(params), {t: train.vision_tree(f) for t, f in finetuned.items()})


def geometry_markdown(geos: dict[str, dict]) -> str:
    """One row per zoo: mean relative norm (min-max over tasks), whole-tower mean |cos| and max
    |cos|, then the mean |cos| of each block."""
    depth = max(len(g["cosine_by_block"]) for g in geos.values())
    lines = ["| zoo | relative norm of tau_k, mean (min-max) | mean abs cos (max) | "
             + " | ".join(f"block {b + 1}" for b in range(depth)) + " |",
             "|---|---:|---:|" + "---:|" * depth]
    for name, g in geos.items():
        rel = list(g["rel_norm"].values())
        lines.append(f"| {name} | {100 * g['rel_norm_mean']:.2f} % ({100 * min(rel):.2f}-"
                     f"{100 * max(rel):.2f}) | {g['cosine_all']['mean_abs']:.3f} "
                     f"({g['cosine_all']['max_abs']:.3f}) | "
                     + " | ".join(f"{c['mean_abs']:.3f}" for c in g["cosine_by_block"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="start from the quick spec")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ZooSpec override (repeatable)")
    p.add_argument("--lams", default="0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--note", default="", help="free text stored in the JSON line")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--pretrain-cache", type=Path, default=None,
                   help="directory caching pretrained models across runs (default: none)")
    p.add_argument("--zoo", type=Path, nargs="+", default=None,
                   help="built zoo directories: print their task-vector geometry and exit")
    p.add_argument("--save", type=Path, default=None,
                   help="pickle the trained zoo state here (for offline analysis)")
    args = p.parse_args(argv)
    if args.zoo:
        print(geometry_markdown({str(z): geometry_of_zoo(z) for z in args.zoo}))
        return 0
    if args.pretrain_cache is not None:
        cached_pretraining(args.pretrain_cache)

    from larv_jax.zoo import train_zoo, zoo_spec

    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k.strip()] = parse_value(v.strip())
    spec = zoo_spec(args.quick, **overrides)
    t0 = time.perf_counter()
    state = train_zoo(seed=args.seed, spec=spec, progress=args.progress, log=print)
    t_train = time.perf_counter() - t0
    if args.save is not None:
        import pickle

        args.save.write_bytes(pickle.dumps(state._replace(tokenizer=state.tokenizer.to_str())))
    lams = [float(s) for s in args.lams.split(",")]
    scorer = _Scorer(state)
    ta = task_arithmetic_accuracy(scorer, lams)
    from larv_jax.zoo import train

    geo = geometry(train.vision_tree(state.params), state.finetuned)
    inter = interference(scorer)
    zs = {n: r["zero_shot_top1"] for n, r in state.results.items()}
    ft = {n: r["finetuned_top1"] for n, r in state.results.items()}
    zs_avg, ft_avg = float(np.mean(list(zs.values()))), float(np.mean(list(ft.values())))
    ta03 = ta.get("0.3")
    line = {
        "note": args.note, "seed": args.seed, "quick": args.quick, "overrides": overrides,
        "spec_hash": spec.digest(), "timings_s": state.timings, "train_seconds": round(t_train, 1),
        "zero_shot": zs, "finetuned": ft, "task_arithmetic": ta,
        "zero_shot_avg": zs_avg, "finetuned_avg": ft_avg,
        "ta_avg": {k: float(np.mean(list(v.values()))) for k, v in ta.items()},
        "geometry": geo, "interference_0.3": inter,
    }
    if ta03 is not None:
        ta_avg = float(np.mean(list(ta03.values())))
        line["regime"] = {
            "ft_minus_zs": 100 * (ft_avg - zs_avg),
            "ta_minus_zs": 100 * (ta_avg - zs_avg),
            "ft_minus_ta": 100 * (ft_avg - ta_avg),
            "ta_at_or_above_zs_tasks": int(sum(ta03[n] >= zs[n] for n in zs)),
        }
        r = line["regime"]
        line["regime"]["met"] = bool(r["ft_minus_zs"] >= 25 and r["ta_minus_zs"] >= 10
                                     and r["ft_minus_ta"] >= 10
                                     and r["ta_at_or_above_zs_tasks"] >= min(6, len(zs) - 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"zero-shot {100 * zs_avg:.1f}  fine-tuned {100 * ft_avg:.1f}  TA "
          + "  ".join(f"{k}:{100 * v:.1f}" for k, v in line["ta_avg"].items()))
    for n in zs:
        print(f"  {n:>13}: zs {100 * zs[n]:5.1f} ft {100 * ft[n]:5.1f} ta0.3 "
              f"{100 * ta03[n] if ta03 else float('nan'):5.1f}  own0.3 {100 * inter[n]['own']:5.1f} "
              f"others0.3 {100 * inter[n]['others']:5.1f}  rel {geo['rel_norm'][n]:.4f}")
    print(f"rel norm mean {geo['rel_norm_mean']:.4f}; cosine all {geo['cosine_all']}")
    print("cos by block (mean_abs): "
          + " ".join(f"{c['mean_abs']:.3f}" for c in geo["cosine_by_block"]))
    print(f"timings {state.timings}; regime {line.get('regime')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
