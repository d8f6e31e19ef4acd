"""Depth-only schedules (SPEC §3, the paper's Table 5/6 baselines) and the one registry of scalers.

A *schedule* gives unit l (1..L, forward order) a scale from its depth alone; a *gate* maps the LARV
score ``w`` (:mod:`larv_jax.larv.gates`) to scales. :data:`SCALERS` is the single literal registry
of both, and :func:`compute_scales` the single entry point; specs are strings such as ``"tiered"``,
``"continuous(gamma=5)"``, ``"uniform(1.2)"`` or ``"thirds(0, 1, 1.5)"`` (:func:`parse_spec`).

How a schedule of ``n`` tiers is mapped "proportionally" onto L units (the paper does not say; this
is our call, kept as the helper :func:`proportional` so other mappings can be written next to it):

    tier index of unit l  =  floor((l - 1) * n / L),   l = 1..L.

So tier k holds the units with ``k L / n <= l - 1 < (k + 1) L / n``; tier sizes differ by at
most one and the extra units of a non-divisible L go to the shallower tiers (L = 37, n = 3: 13, 12,
12 units, the same split as the tiered gate's ``ceil(L / 3)``). With ``n > L`` some tiers are
skipped (e.g. ``tier12`` on L = 4 uses tiers 0, 3, 6, 9). ``linear`` interpolates instead:
``s_l = start + (end - start) (l - 1) / (L - 1)`` (``(start + end) / 2`` when L = 1).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from larv_jax.larv import gates

TIER6 = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5)


def _check_units(num_units: int) -> int:
    if int(num_units) != num_units or num_units < 1:
        raise ValueError(f"num_units must be a positive integer; got {num_units}")
    return int(num_units)


def tier_index(num_units: int, num_tiers: int) -> np.ndarray:
    """``floor((l - 1) * n / L)`` for ``l = 1..L``: ``[L]`` int, the tier of each unit."""
    num_units, num_tiers = _check_units(num_units), _check_units(num_tiers)
    return (np.arange(num_units) * num_tiers) // num_units


def proportional(num_units: int, values: Sequence[float]) -> np.ndarray:
    """Piecewise-constant schedule: tier k (``values[k]``) over its proportional share of depth."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"schedule values must be a non-empty list; got {values.tolist()}")
    return values[tier_index(num_units, values.size)]


def uniform(num_units: int, value: float = 1.0) -> np.ndarray:
    """``s_l = value`` for every unit (the paper's ``uniform(c)``; ``uniform(1)`` is the plain
    merge)."""
    return np.full(_check_units(num_units), float(value))


def linear(num_units: int, start: float = 0.5, end: float = 1.5) -> np.ndarray:
    """``s_l = start + (end - start) (l - 1) / (L - 1)``: 0.5 at the first unit, 1.5 at the last."""
    num_units = _check_units(num_units)
    if num_units == 1:
        return np.array([(start + end) / 2.0])
    return start + (end - start) * np.arange(num_units, dtype=np.float64) / (num_units - 1)


def tier2(num_units: int) -> np.ndarray:
    """0.5 on the shallow half, 1.5 on the deep half (proportional)."""
    return proportional(num_units, (0.5, 1.5))


def tier3(num_units: int) -> np.ndarray:
    """0.5, 1.0, 1.5 by thirds of depth (proportional)."""
    return proportional(num_units, (0.5, 1.0, 1.5))


def tier6(num_units: int) -> np.ndarray:
    """0.5, 0.7, 0.9, 1.1, 1.3, 1.5 by sixths of depth (proportional)."""
    return proportional(num_units, TIER6)


def tier12(num_units: int) -> np.ndarray:
    """Twelve values linearly from 0.5 to 1.5 (``linspace(0.5, 1.5, 12)``), by twelfths of depth."""
    return proportional(num_units, np.linspace(0.5, 1.5, 12))


def thirds(num_units: int, s_s: float = 0.5, s_m: float = 1.0, s_d: float = 1.5) -> np.ndarray:
    """Shallow / middle / deep thirds at ``s_s, s_m, s_d`` (freeze ablations: (0, 1, 1.5))."""
    return proportional(num_units, (s_s, s_m, s_d))


def none(num_units: int) -> np.ndarray:
    """No veneer: every scale 1 (``theta0 + D``, the plain merge bit for bit)."""
    return uniform(num_units, 1.0)


class Scaler(NamedTuple):
    """A registry entry. ``uses_scores``: ``fn(w[L], **options)`` (a gate); otherwise
    ``fn(L, *args, **options)`` (a depth-only schedule)."""

    fn: Callable[..., np.ndarray]
    uses_scores: bool


SCALERS: dict[str, Scaler] = {
    "tiered": Scaler(gates.tiered_gate, True),
    "continuous": Scaler(gates.continuous_gate, True),
    "none": Scaler(none, False),
    "uniform": Scaler(uniform, False),
    "linear": Scaler(linear, False),
    "tier2": Scaler(tier2, False),
    "tier3": Scaler(tier3, False),
    "tier6": Scaler(tier6, False),
    "tier12": Scaler(tier12, False),
    "thirds": Scaler(thirds, False),
}

# Options of the composite score (gates.composite_score), accepted alongside any scaler's options.
SCORE_OPTIONS = ("eta", "rho", "zeta", "use_e", "use_r", "use_c")

_SPEC_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$", re.S)


def get_scaler(name: str) -> Scaler:
    try:
        return SCALERS[name]
    except KeyError:
        raise ValueError(f"unknown LARV gate/schedule {name!r}; valid: {sorted(SCALERS)}") from None


def parse_spec(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``"thirds(0, 1, 1.5)"`` -> ``("thirds", (0, 1, 1.5), {})``;
    ``"tiered(alpha=0.25, tiers=(0.4, 1, 1.6))"`` -> ``("tiered", (), {"alpha": 0.25, ...})``.

    Arguments are Python literals (numbers, booleans, tuples). Raises ValueError for a malformed
    spec or an unknown name (listing the valid ones).
    """
    m = _SPEC_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"malformed LARV gate/schedule spec {spec!r}; expected NAME or "
                         f"NAME(args), e.g. 'tiered', 'uniform(1.2)', 'thirds(0,1,1.5)'")
    name, inner = m.group(1), m.group(2)
    get_scaler(name)
    if inner is None or not inner.strip():
        return name, (), {}
    try:
        call = ast.parse(f"_({inner})", mode="eval").body
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"malformed arguments in LARV spec {spec!r}: {e}") from None
    if any(k is None for k in kwargs):
        raise ValueError(f"malformed arguments in LARV spec {spec!r}: no ** allowed")
    return name, args, kwargs


class Scales(NamedTuple):
    """Result of :func:`compute_scales`: all ``[L]`` float64; ``z``/``w`` are None when no
    diagnostics were given (a depth-only schedule needs none)."""

    s: np.ndarray
    z: np.ndarray | None
    w: np.ndarray | None


def _accepted(fn: Callable) -> set[str]:
    return {p.name for p in list(inspect.signature(fn).parameters.values())[1:]}


def compute_scales(spec: str, *, e: Any = None, c: Any = None, num_units: int | None = None,
                   **options: Any) -> Scales:
    """Per-unit scales ``s[L]`` for a gate or schedule spec (SPEC §3).

    Args:
      spec: a :data:`SCALERS` name, optionally with arguments (:func:`parse_spec`).
      e, c: ``[L]`` diagnostics. Required by score gates (``tiered``, ``continuous``); optional for
        schedules, where they only fill the reported ``z`` and ``w``.
      num_units: L, needed by a schedule when ``e``/``c`` are not given.
      **options: keyword options of the scaler (e.g. ``alpha``, ``beta``, ``tiers``, ``gamma``, a
        schedule's ``value``) and of the score (:data:`SCORE_OPTIONS`: ``eta``, ``rho``, ``zeta``,
        ``use_e``, ``use_r``, ``use_c``). Options given in the spec string win over these.

    Raises ValueError for an unknown name or option, or missing diagnostics.
    """
    name, args, spec_kwargs = parse_spec(spec)
    scaler = SCALERS[name]
    options = {**options, **spec_kwargs}
    score_opts = {k: options.pop(k) for k in SCORE_OPTIONS if k in options}
    valid = _accepted(scaler.fn)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for LARV {name!r}; valid: "
                         f"{sorted(valid | set(SCORE_OPTIONS))}")
    z = w = None
    if e is not None and c is not None:
        z = gates.zscore(c)
        w = gates.composite_score(e, c, **score_opts)
    if scaler.uses_scores:
        if w is None:
            raise ValueError(f"LARV gate {name!r} needs the diagnostics e and c")
        if args:
            raise ValueError(f"LARV gate {name!r} takes keyword options only; got {args}")
        s = scaler.fn(w, **options)
    else:
        if num_units is None:
            if w is None:
                raise ValueError(f"LARV schedule {name!r} needs num_units (or e and c)")
            num_units = w.size
        if w is not None and w.size != num_units:
            raise ValueError(f"num_units={num_units} but diagnostics have {w.size} units")
        try:
            s = scaler.fn(num_units, *args, **options)
        except TypeError as err:
            raise ValueError(f"bad arguments for LARV schedule {name!r}: {err}") from None
    s = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"LARV {spec!r} produced non-finite scales: {s.tolist()}")
    return Scales(s, z, w)


def describe(spec: str, **options: Any) -> str:
    """A canonical one-line label of a spec plus options, e.g. ``tiered(alpha=0.25)``."""
    name, args, kwargs = parse_spec(spec)
    kwargs = {**options, **kwargs}
    items = [repr(a) if not isinstance(a, float) else f"{a:g}" for a in args]
    items += [f"{k}={_fmt(v)}" for k, v in sorted(kwargs.items())]
    return f"{name}({', '.join(items)})" if items else name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)


def is_identity(spec: str, **options: Any) -> bool:
    """True when the spec is the plain merge (``none`` or ``uniform(1)``) and needs no scaling."""
    name, args, kwargs = parse_spec(spec)
    if name == "none":
        return True
    if name == "uniform":
        c = args[0] if args else {**options, **kwargs}.get("value", 1.0)
        return math.isclose(float(c), 1.0, rel_tol=0.0, abs_tol=0.0)
    return False
