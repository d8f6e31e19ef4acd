"""The diagnostics record (per-unit e, c plus per-matrix values) and its writers (JSON, CSV, PNG)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from larv_jax.diagnostics.unit_rules import Unit, unit_table
from larv_jax.io import atomic_path


class MatrixDiag(NamedTuple):
    """Diagnostics of one matrix (torch orientation ``shape = (out, in)``)."""

    unit: str
    depth: int
    path: str
    block: int | None
    shape: tuple[int, int]
    reff_base: float
    reff_delta: float
    norm_base: float
    norm_delta: float
    e: float
    c: float


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """LARV diagnostics of one merge: ``e[L]``, ``c[L]`` (unit means of their matrices).

    ``settings`` records how they were computed (mode, k, p, q, seed, eps, ...).
    """

    units: tuple[Unit, ...]
    e: np.ndarray
    c: np.ndarray
    matrices: tuple[MatrixDiag, ...]
    settings: dict[str, Any]

    @property
    def depth(self) -> np.ndarray:
        return np.array([u.depth for u in self.units])

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def to_dict(self, s: Sequence[float] | None = None) -> dict[str, Any]:
        per_unit: dict[str, list[dict[str, Any]]] = {u.name: [] for u in self.units}
        for m in self.matrices:
            d = m._asdict()
            d["shape"] = list(m.shape)
            per_unit[m.unit].append({k: v for k, v in d.items() if k not in ("unit", "depth")})
        table = {t["name"]: t for t in unit_table(self.units)}
        out_units = []
        for i, u in enumerate(self.units):
            row = {"name": u.name, "depth": u.depth, "e": float(self.e[i]), "c": float(self.c[i])}
            if s is not None:
                row["s"] = float(s[i])
            row["attached"] = table[u.name]["attached"]
            row["matrices"] = per_unit[u.name]
            out_units.append(row)
        return {"settings": self.settings, "num_units": len(self.units), "units": out_units}


def _check_s(diag: Diagnostics, s: Sequence[float] | None) -> np.ndarray | None:
    if s is None:
        return None
    s = np.asarray(s, np.float64)
    if s.shape != (len(diag.units),):
        raise ValueError(f"scales have shape {s.shape}; expected ({len(diag.units)},)")
    return s


def to_json(diag: Diagnostics, path: str | Path, *, s: Sequence[float] | None = None) -> Path:
    """Write the record (units with their per-matrix values; ``s`` if given) as JSON, atomically."""
    s = _check_s(diag, s)
    text = json.dumps(diag.to_dict(s), indent=1, allow_nan=True) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


CSV_FIELDS = ("unit", "depth", "level", "path", "block", "shape", "reff_base", "reff_delta",
              "norm_base", "norm_delta", "e", "c", "s")


def to_csv(diag: Diagnostics, path: str | Path, *, s: Sequence[float] | None = None) -> Path:
    """Write one ``level=unit`` row per unit then one ``level=matrix`` row per matrix, atomically."""
    s = _check_s(diag, s)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for i, u in enumerate(diag.units):
        w.writerow({"unit": u.name, "depth": u.depth, "level": "unit", "e": repr(float(diag.e[i])),
                    "c": repr(float(diag.c[i])), "s": "" if s is None else repr(float(s[i]))})
    for m in diag.matrices:
        row = m._asdict()
        row.update(level="matrix", shape="x".join(map(str, m.shape)),
                   block="" if m.block is None else m.block)
        for f in ("reff_base", "reff_delta", "norm_base", "norm_delta", "e", "c"):
            row[f] = repr(float(row[f]))
        w.writerow(row)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


def plot(diag: Diagnostics, path: str | Path, *, s: Sequence[float] | None = None,
         title: str | None = None) -> Path:
    """PNG of e and c against depth (the LARV paper's Figure 2), plus s when given (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    s = _check_s(diag, s)
    depth = diag.depth
    n_ax = 3 if s is not None else 2
    fig, axes = plt.subplots(n_ax, 1, figsize=(max(6.0, 0.18 * len(depth) + 3), 2.2 * n_ax),
                             sharex=True)
    series = [("e (effective-rank contrast)", diag.e, "tab:blue"),
              ("c (commutator conflict)", diag.c, "tab:red")]
    if s is not None:
        series.append(("s (LARV scale)", s, "tab:green"))
    for ax, (label, y, color) in zip(axes, series, strict=True):
        ax.plot(depth, y, marker="o", ms=3, color=color)
        ax.set_ylabel(label.split(" ")[0])
        ax.set_title(label, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(f"depth l (1..{len(depth)}, {diag.settings.get('granularity', '')} units)")
    step = max(1, math.ceil(len(depth) / 20))
    axes[-1].set_xticks(depth[::step])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
