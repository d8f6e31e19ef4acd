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
# Control veneer: uniform(mean of the continuous gate's s) per base merger.
MATCHED = "matched_uniform"
QUICK_SCHEDULES = ("linear",)


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
