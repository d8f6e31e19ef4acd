"""The demo's seed study: one zoo per seed, every merger x veneer, aggregated over seeds.

Pure functions over the demo's result rows (``{"merger", "gate", "eval": {"tasks": ...}}``, one
list per seed); ``larv demo --seeds`` does the I/O. For each (merger, veneer) cell and each seed,
``a`` is the average top-1 over the zoo's tasks and the gain is ``a(veneer) - a(plain merger)``
of the same seed (the plain merger is the ``none`` veneer). Over seeds we report the mean and the
sample standard deviation (ddof = 1; none with a single seed), how many seeds improve (gain > 0),
and, beside each LARV gate, its matched-uniform control (one uniform scale equal to the mean of
that gate's scales, :data:`larv_jax.zoo.report.MATCHED_PREFIX`) and the gate's gain over it.

A gain "exceeds its seed-to-seed spread" when ``|mean| > sd`` and every seed has the same sign
(with one seed nothing can be said, and nothing is claimed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _avg(row: Mapping[str, Any], tasks: Sequence[str]) -> float:
    return float(np.mean([float(row["eval"]["tasks"][t]["top1"]) for t in tasks]))


def stats(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd" (ddof 1, None for one value), "n", "improved" (count > 0), "values"}``."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size), "improved": int(np.sum(v > 0)), "values": [float(x) for x in v]}


def exceeds_spread(s: Mapping[str, Any]) -> bool:
    """``|mean| > sd`` and all seeds of one sign (False with fewer than two seeds)."""
    if s["sd"] is None:
        return False
    v = np.asarray(s["values"])
    same_sign = bool(np.all(v > 0) or np.all(v < 0))
    return bool(abs(s["mean"]) > s["sd"] and same_sign)


def aggregate(runs: Mapping[int, Sequence[Mapping[str, Any]]], tasks_by_seed: Mapping[int, Sequence[str]],
              *, gates: Sequence[str], matched: Mapping[str, str]) -> list[dict[str, Any]]:
    """One entry per (merger, veneer) present in every seed's rows, in first-seed order.

    runs: ``{seed: rows}``; tasks_by_seed: ``{seed: task names}``; gates: the LARV gates that
    have a matched control; matched: ``{gate: control veneer name}``. Entries:
    ``{"merger", "veneer", "accuracy": stats, "gain": stats | None (plain rows),
    "matched": stats of the control's gain | None, "vs_matched": stats of gate - control | None,
    "gain_exceeds_spread": bool, "vs_matched_exceeds_spread": bool}``.
    """
    seeds = list(runs)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    cells = {s: {(r["merger"], r["gate"]): _avg(r, tasks_by_seed[s]) for r in runs[s] if "eval" in r}
             for s in seeds}
    order = list(dict.fromkeys((r["merger"], r["gate"]) for r in runs[seeds[0]] if "eval" in r))
    controls = set(matched.values())
    out = []
    for merger, veneer in order:
        if veneer in controls or not all((merger, veneer) in cells[s] for s in seeds):
            continue
        if not all((merger, "none") in cells[s] for s in seeds):
            continue
        acc = [cells[s][(merger, veneer)] for s in seeds]
        plain = [cells[s][(merger, "none")] for s in seeds]
        entry: dict[str, Any] = {"merger": merger, "veneer": veneer, "accuracy": stats(acc),
                                 "gain": None, "matched": None, "vs_matched": None,
                                 "gain_exceeds_spread": False, "vs_matched_exceeds_spread": False}
        if veneer != "none":
            entry["gain"] = stats([a - p for a, p in zip(acc, plain, strict=True)])
            entry["gain_exceeds_spread"] = exceeds_spread(entry["gain"])
        control = matched.get(veneer) if veneer in gates else None
        if control is not None and all((merger, control) in cells[s] for s in seeds):
            ctrl = [cells[s][(merger, control)] for s in seeds]
            entry["matched"] = stats([c - p for c, p in zip(ctrl, plain, strict=True)])
            entry["vs_matched"] = stats([a - c for a, c in zip(acc, ctrl, strict=True)])
            entry["vs_matched_exceeds_spread"] = exceeds_spread(entry["vs_matched"])
        out.append(entry)
    return out


def pm(s: Mapping[str, Any] | None, signed: bool = True) -> str:
    """``stats`` as points: "+1.23 ± 0.45" (the mean alone with one seed, "" for None)."""
    if s is None:
        return ""
    mean = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
    return mean if s["sd"] is None else f"{mean} ± {100 * s['sd']:.2f}"


def table(entries: Sequence[Mapping[str, Any]], *, display: Mapping[str, str] | None = None) -> str:
    """Markdown: merger, veneer, average top-1 (mean ± sd over seeds), gain over the plain merger
    (mean ± sd, seeds improved, whether it exceeds the spread), the matched-uniform control's
    gain and the gate's gain over that control. Values in points (%)."""
    display = display or {}
    lines = ["| Merger | Veneer | Avg. top-1 | Gain | Seeds improved | Gain > spread | "
             "Matched uniform gain | Gate - matched | > spread |",
             "|---|---|---:|---:|---:|:---:|---:|---:|:---:|"]
    for e in entries:
        gain = e["gain"]
        improved = f"{gain['improved']}/{gain['n']}" if gain else ""
        lines.append(
            f"| {display.get(e['merger'], e['merger'])} | {e['veneer']} | "
            f"{pm(e['accuracy'], signed=False)} | {pm(gain)} | {improved} | "
            f"{'yes' if e['gain_exceeds_spread'] else ('no' if gain else '')} | "
            f"{pm(e['matched'])} | {pm(e['vs_matched'])} | "
            f"{'yes' if e['vs_matched_exceeds_spread'] else ('no' if e['vs_matched'] else '')} |")
    return "\n".join(lines)


def veneer_summary(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per veneer over the mergers: mean gain (the mean over mergers of the seed-mean gains),
    how many mergers' gains exceed their spread upward / downward, and the same against the
    matched control."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["gain"] is None:
            continue
        v = out.setdefault(e["veneer"], {"mergers": 0, "gains": [], "up": 0, "down": 0,
                                         "vs_matched": [], "vs_matched_up": 0,
                                         "vs_matched_down": 0})
        v["mergers"] += 1
        v["gains"].append(e["gain"]["mean"])
        if e["gain_exceeds_spread"]:
            v["up" if e["gain"]["mean"] > 0 else "down"] += 1
        if e["vs_matched"] is not None:
            v["vs_matched"].append(e["vs_matched"]["mean"])
            if e["vs_matched_exceeds_spread"]:
                v["vs_matched_up" if e["vs_matched"]["mean"] > 0 else "vs_matched_down"] += 1
    for v in out.values():
        v["mean_gain"] = float(np.mean(v.pop("gains")))
        vm = v.pop("vs_matched")
        v["mean_vs_matched"] = float(np.mean(vm)) if vm else None
    return out
