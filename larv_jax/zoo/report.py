"""The demo's grid and tables: which cells run, and the LARV-paper-Table-1-shaped markdown.

Pure functions over result rows (``{"merger", "method", "gate", "eval": {"tasks": {t: top1}}}``
as :func:`larv_jax.larv.grid.run_grid` yields them); the ``larv demo`` command does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DISPLAY = {
    "simple_average": "Simple Averaging", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
    "ties_paper": "TIES (paper preset)", "dare_task_arithmetic": "DARE-TA",
    "dare_ties": "DARE-TIES", "dare_average": "DARE-Average", "tsv_m": "TSV-M", "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
}
# LARV gates (score-based) shown under each base merger in the main table.
LARV_GATES = ("tiered", "continuous")
# Depth-only schedules (the LARV paper's Table 5/6 baselines), shown in the schedule table.
SCHEDULES = ("linear", "tier2", "tier3", "tier6", "tier12")
QUICK_METHODS = ("task_arithmetic", "ties")
# Control veneers: uniform(mean of a LARV gate's s) per base merger and gate.
MATCHED = "matched_uniform"
QUICK_SCHEDULES = ("linear",)
# Task Arithmetic's coefficient sweep (plain and LARV tiered).
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUICK_LAMBDAS = (0.1, 0.3, 1.0)


def matched_name(gate: str) -> str:
    """The control veneer of ``gate``: a uniform scale equal to the mean of its scales."""
    return f"{MATCHED}({gate})"


def lambda_label(lam: float) -> str:
    return f"task_arithmetic@{lam:g}"


def grid(methods: Sequence[str], schedules: Sequence[str]
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(mergers, gates)`` entries for :func:`larv_jax.larv.grid.run_grid`: every method, each
    plain (``none``), with the LARV gates, and with the depth-only schedules."""
    mergers = [{"name": m, "method": m} for m in methods]
    gates = [{"gate": "none", "name": "none"}]
    gates += [{"gate": g, "name": g} for g in LARV_GATES]
    gates += [{"gate": s, "name": s} for s in schedules]
    return mergers, gates


def pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def _gain(x: float, ref: float) -> str:
    d = 100 * (x - ref)
    return f"{pct(x)} ({'+' if d >= 0 else '-'}{abs(d):.1f})"


def accuracies(row: Mapping[str, Any], tasks: Sequence[str]) -> list[float]:
    """Per-task top-1 of a row, in ``tasks`` order, then the unweighted mean."""
    accs = [float(row["eval"]["tasks"][t]["top1"]) for t in tasks]
    return [*accs, float(np.mean(accs))]


def main_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], *,
               pretrained: Sequence[float], individual: Sequence[float]) -> str:
    """Rows = methods, columns = tasks + average (top-1, %). Under each base merger, its LARV rows
    show the gain over that merger in parentheses (Table 1 of the LARV paper)."""
    head = "| Method | " + " | ".join(tasks) + " | Avg. |"
    sep = "|---|" + "---:|" * (len(tasks) + 1)
    lines = [head, sep,
             "| Pretrained (zero-shot) | " + " | ".join(pct(v) for v in pretrained) + " |",
             "| Individual (fine-tuned) | " + " | ".join(pct(v) for v in individual) + " |"]
    by = {(r["merger"], r["gate"]): r for r in rows if "eval" in r}
    for merger in dict.fromkeys(r["merger"] for r in rows):
        base = by.get((merger, "none"))
        if base is None:
            continue
        ref = accuracies(base, tasks)
        lines.append(f"| {DISPLAY.get(merger, merger)} | " + " | ".join(pct(v) for v in ref) + " |")
        for gate in LARV_GATES:
            r = by.get((merger, gate))
            if r is None:
                continue
            vals = accuracies(r, tasks)
            lines.append(f"| + LARV ({gate}) | "
                         + " | ".join(_gain(v, b) for v, b in zip(vals, ref, strict=True)) + " |")
    return "\n".join(lines)


def schedule_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Average top-1 (%) per base merger (rows) and veneer (columns: none, LARV gates, depth-only
    schedules), with the best column of each row in bold."""
    gates = list(dict.fromkeys(r["gate"] for r in rows))
    lines = ["| Base merger | " + " | ".join(gates) + " |", "|---|" + "---:|" * len(gates)]
    by = {(r["merger"], r["gate"]): r for r in rows if "eval" in r}
    for merger in dict.fromkeys(r["merger"] for r in rows):
        avgs = [accuracies(by[(merger, g)], tasks)[-1] if (merger, g) in by else float("nan")
                for g in gates]
        best = np.nanmax(avgs)
        cells = [f"**{pct(a)}**" if a == best else pct(a) for a in avgs]
        lines.append(f"| {DISPLAY.get(merger, merger)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def larv_summary(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Mean / min / max average-accuracy gain of each gate over its base merger, and how many
    base mergers it improves (strictly)."""
    by = {(r["merger"], r["gate"]): r for r in rows if "eval" in r}
    gates = [g for g in dict.fromkeys(r["gate"] for r in rows) if g != "none"]
    out = {}
    for g in gates:
        gains = [accuracies(by[(m, g)], tasks)[-1] - accuracies(by[(m, "none")], tasks)[-1]
                 for m, gg in by if gg == g and (m, "none") in by]
        if gains:
            out[g] = {"mean_gain": float(np.mean(gains)), "min_gain": float(np.min(gains)),
                      "max_gain": float(np.max(gains)), "improved": int(np.sum(np.asarray(gains) > 0)),
                      "mergers": len(gains)}
    return out


def lambda_curves(lam_rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]
                  ) -> dict[str, dict[str, float]]:
    """``{gate: {lambda: average top-1}}`` of the Task Arithmetic sweep."""
    out: dict[str, dict[str, float]] = {}
    for r in lam_rows:
        lam = r["method_options"]["scale"]
        out.setdefault(r["gate"], {})[f"{lam:g}"] = accuracies(r, tasks)[-1]
    return out


def lambda_table(lam_rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Markdown: lambda x (plain, LARV tiered) average top-1 (%), the best of each column bold."""
    curves = lambda_curves(lam_rows, tasks)
    gates = list(curves)
    lams = list(dict.fromkeys(k for c in curves.values() for k in c))
    best = {g: max(curves[g].values()) for g in gates}
    head = "| lambda | " + " | ".join("Task Arithmetic" if g == "none" else f"+ LARV ({g})"
                                      for g in gates) + " |"
    lines = [head, "|---:|" + "---:|" * len(gates)]
    for lam in lams:
        cells = []
        for g in gates:
            v = curves[g].get(lam)
            cells.append("" if v is None else (f"**{pct(v)}**" if v == best[g] else pct(v)))
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_lambda(lam_rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], path, *,
                title: str | None = None):
    """PNG of average top-1 against Task Arithmetic's lambda, one line per gate (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from larv_jax.diagnostics.record import save_png

    curves = lambda_curves(lam_rows, tasks)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for gate, c in curves.items():
        xs = [float(k) for k in c]
        ax.plot(xs, [100 * v for v in c.values()], marker="o", ms=4,
                label="Task Arithmetic" if gate == "none" else f"+ LARV ({gate})")
    ax.set_xlabel("lambda (Task Arithmetic coefficient)")
    ax.set_ylabel("average top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def _best(curve: Mapping[str, float]) -> tuple[str, float]:
    lam = max(curve, key=curve.get)
    return lam, curve[lam]


def _depth_only_sentence(mean_gain: Mapping[str, float]) -> str:
    """One sentence on the depth-only schedules' mean gains (every veneer of ``mean_gain`` that
    is not a LARV gate) and whether a LARV gate's mean gain beats the best of them; '' if none."""
    depth_only = {v: g for v, g in mean_gain.items() if v not in LARV_GATES}
    if not depth_only:
        return ""
    best = max(depth_only, key=depth_only.get)
    beaten = [g for g in LARV_GATES if g in mean_gain and mean_gain[g] > depth_only[best]]
    verdict = (f"{' and '.join(beaten)} beat{'s' if len(beaten) == 1 else ''} the best of them"
               if beaten else "no LARV gate beats the best of them")
    return (f"The depth-only schedules, which look at no weights, change the average by "
            f"{100 * min(depth_only.values()):+.2f} to {100 * max(depth_only.values()):+.2f} "
            f"points (best: {best}); {verdict}.")


def plain_summary(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], *,
                  pretrained: Sequence[float], individual: Sequence[float],
                  lam_rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """A few plain sentences on one seed's table: where merging sits, what each LARV gate does
    against its plain merger and against its matched-uniform control, and the lambda sweep."""
    by = {(r["merger"], r["gate"]): accuracies(r, tasks)[-1] for r in rows if "eval" in r}
    mergers = list(dict.fromkeys(m for m, g in by if g == "none"))
    if not mergers:
        return "No plain merger was run."
    zs, ft = pretrained[-1], individual[-1]
    plain = {m: by[(m, "none")] for m in mergers}
    best = max(plain, key=plain.get)
    above = sum(v > zs for v in plain.values())
    out = [f"Zero-shot {pct(zs)} %, fine-tuned individually {pct(ft)} %. The plain mergers "
           f"range from {pct(min(plain.values()))} to {pct(max(plain.values()))} % "
           f"({above} of {len(plain)} above zero-shot); the best is "
           f"{DISPLAY.get(best, best)} ({pct(plain[best])} %)."]
    for gate in LARV_GATES:
        gains = [by[(m, gate)] - plain[m] for m in mergers if (m, gate) in by]
        ctrl = [by[(m, matched_name(gate))] - plain[m] for m in mergers
                if (m, matched_name(gate)) in by]
        if not gains:
            continue
        text = (f"LARV {gate} changes the average by {100 * np.mean(gains):+.2f} points over the "
                f"{len(gains)} mergers (from {100 * min(gains):+.1f} to {100 * max(gains):+.1f}; "
                f"{sum(g > 0 for g in gains)} improved)")
        if ctrl:
            diff = [by[(m, gate)] - by[(m, matched_name(gate))] for m in mergers
                    if (m, gate) in by and (m, matched_name(gate)) in by]
            text += (f"; a uniform scale with the same mean gives {100 * np.mean(ctrl):+.2f}, so "
                     f"the gate's depth profile adds {100 * np.mean(diff):+.2f} on average "
                     f"({sum(d > 0 for d in diff)} of {len(diff)} mergers better than their "
                     "control)")
        out.append(text + ".")
    controls = {matched_name(g) for g in LARV_GATES}
    mean_gain = {}
    for v in dict.fromkeys(g for _, g in by):
        gains = [by[(m, v)] - plain[m] for m in mergers if (m, v) in by]
        if v != "none" and v not in controls and gains:
            mean_gain[v] = float(np.mean(gains))
    text = _depth_only_sentence(mean_gain)
    if text:
        out.append(text)
    if lam_rows:
        curves = lambda_curves(lam_rows, tasks)
        parts = []
        for gate, c in curves.items():
            lam, acc = _best(c)
            name = "Task Arithmetic" if gate == "none" else f"with LARV {gate}"
            spread = 100 * (max(c.values()) - min(c.values()))
            parts.append(f"{name} peaks at lambda {lam} ({pct(acc)} %; {spread:.1f} points "
                         "between its best and worst lambda)")
        out.append("On the lambda sweep, " + "; ".join(parts) + ".")
    out.append("This is one seed: differences of a point or two can be seed noise; "
               "`larv demo --seeds 0,1,2` measures the spread.")
    return " ".join(out)


def study_summary(entries: Sequence[Mapping[str, Any]], seeds: Sequence[int],
                  results: Mapping[int, Mapping[str, Any]]) -> str:
    """Plain sentences on the seed study: which gains exceed their seed-to-seed spread."""
    from larv_jax.zoo import seeds as seed_study

    zs = seed_study.stats([results[s]["pretrained"][-1] for s in seeds])
    ft = seed_study.stats([results[s]["individual"][-1] for s in seeds])
    out = [f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}): zero-shot "
           f"{seed_study.pm(zs, signed=False)} %, fine-tuned {seed_study.pm(ft, signed=False)} %."]
    summary = seed_study.veneer_summary(entries)
    for gate in (*LARV_GATES, *[v for v in summary if v not in LARV_GATES]):
        v = summary.get(gate)
        if v is None:
            continue
        text = (f"{gate}: mean gain {100 * v['mean_gain']:+.2f} points over {v['mergers']} "
                f"mergers; above its spread upward on {v['up']}, downward on {v['down']}")
        if v["mean_vs_matched"] is not None:
            text += (f"; against its matched uniform control {100 * v['mean_vs_matched']:+.2f} "
                     f"(above the spread upward on {v['vs_matched_up']}, downward on "
                     f"{v['vs_matched_down']})")
        out.append(text + ".")
    text = _depth_only_sentence({v: summary[v]["mean_gain"] for v in summary})
    if text:
        out.append(text)
    real = [e for e in entries if e["gain_exceeds_spread"] and e["veneer"] in LARV_GATES]
    if real:
        out.append("LARV gains that exceed their spread: " + ", ".join(
            f"{DISPLAY.get(e['merger'], e['merger'])} + {e['veneer']} "
            f"({100 * e['gain']['mean']:+.1f} ± {100 * e['gain']['sd']:.1f})" for e in real) + ".")
    else:
        out.append("No LARV gate's gain exceeds its seed-to-seed spread.")
    return " ".join(out)
