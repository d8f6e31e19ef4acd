"""LARV score and gates (SPEC §3, the paper's Eq. 8-9 and Appendix A): per-unit e, c -> w -> s.

Everything here is a pure function on short host vectors (length L, the number of LARV units, 37 for
a ViT-B/32 vision tower at ``module`` granularity). They accept any array-like and compute in numpy
float64, so ties and quantile indices are exact and reproducible; the per-leaf arithmetic that the
scales feed (``theta0 + s * D``) is :func:`larv_jax.merging.apply_delta`.

The single registry of everything that turns diagnostics into scales (score gates *and* depth-only
schedules) is :data:`larv_jax.larv.schedules.SCALERS`; :func:`larv_jax.larv.schedules.compute_scales`
is the one entry point, and :func:`larv_jax.larv.plan.plan` the one caller of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Relative guard on ceil(q L) so that a q L that is an integer up to rounding (e.g. 2/3 * 6) is not
# pushed to the next index.
_QUANTILE_TOL = 1e-9


def _vec(x: Any, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty vector [L]; got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite entries: {v.tolist()}")
    return v


def zscore(c: Any, *, min_std: float = 1e-12) -> np.ndarray:
    """z-standardised conflict ``(c - mean c) / std c`` over the L units (SPEC §3).

    ``c``: ``[L]``. Population std (``ddof=0``); if it is below ``min_std`` every z is 0 (a model
    whose units all conflict equally carries no conflict signal).
    """
    c = _vec(c, "c")
    std = float(np.std(c))
    if std < min_std:
        return np.zeros_like(c)
    return (c - np.mean(c)) / std


def depth_prior(num_units: int) -> np.ndarray:
    """``r_l = l / L`` for ``l = 1..L`` (forward order): ``[L]`` in (0, 1]."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1; got {num_units}")
    return np.arange(1, num_units + 1, dtype=np.float64) / num_units


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))``, overflow-safe."""
    return np.logaddexp(0.0, x)


def composite_score(e: Any, c: Any, *, eta: float = 1.0, rho: float = 0.5, zeta: float = 1.0,
                    use_e: bool = True, use_r: bool = True, use_c: bool = True) -> np.ndarray:
    """LARV composite score (Eq. 8): ``w_l = e_l^eta * r_l^rho / (softplus(z(c)_l) + 1)^zeta``.

    Args:
      e: ``[L]`` effective-rank contrast per unit (``r_eff(theta0_l) / (r_eff(D_l) + eps)``, >= 0).
      c: ``[L]`` commutator conflict per unit.
      eta, rho, zeta: exponents of the three factors (paper defaults 1, 0.5, 1).
      use_e, use_r, use_c: ablation switches (the paper's Table 3); a switched-off factor is 1.

    Returns ``w``: ``[L]`` float64, >= 0 when ``e >= 0``.

    A unit whose merged update is numerically zero has ``e = 0`` (SPEC §2), hence ``w = 0`` and the
    lowest tier; that is harmless because ``s * 0 = 0`` leaves it at the base.
    """
    e = _vec(e, "e")
    c = _vec(c, "c")
    if e.shape != c.shape:
        raise ValueError(f"e and c must have the same length; got {e.shape} and {c.shape}")
    w = np.ones_like(e)
    if use_e:
        if np.any(e < 0):
            raise ValueError(f"effective-rank contrast e must be >= 0; got {e.tolist()}")
        w = w * e**eta
    if use_r:
        w = w * depth_prior(e.size) ** rho
    if use_c:
        w = w / (softplus(zscore(c)) + 1.0) ** zeta
    return w


def lower_quantile(w: Any, q: float) -> float:
    """Lower empirical quantile ``inf{t : F(t) >= q}`` = ``sorted(w)[ceil(q L) - 1]`` (SPEC §3).

    ``q`` in [0, 1]; ``q = 0`` gives the minimum (the index is clamped at 0). Ties are kept: the
    threshold is a value of ``w``, and every unit equal to it counts as ``<= t``.
    """
    w = _vec(w, "w")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1]; got {q}")
    idx = math.ceil(q * w.size * (1.0 - _QUANTILE_TOL)) - 1
    return float(np.sort(w)[min(max(idx, 0), w.size - 1)])


def tiered_gate(w: Any, *, alpha: float = 1 / 3, beta: float = 2 / 3,
                tiers: Sequence[float] = (0.5, 1.0, 1.5)) -> np.ndarray:
    """Tiered gate (Eq. 9, default): ``s = tiers[0]`` if ``w <= t1``, ``tiers[1]`` if
    ``t1 < w <= t2``, ``tiers[2]`` otherwise, with ``t1, t2`` the lower empirical quantiles of ``w``
    at ``alpha``, ``beta`` (:func:`lower_quantile`).

    ``w``: ``[L]`` scores. Returns ``s``: ``[L]`` float64. With ties at a threshold, every tied unit
    takes the lower tier, so the bottom tier may hold more than ``ceil(alpha L)`` units.
    """
    w = _vec(w, "w")
    if not alpha <= beta:
        raise ValueError(f"tiered gate needs alpha <= beta; got alpha={alpha}, beta={beta}")
    tiers = tuple(float(t) for t in tiers)
    if len(tiers) != 3:
        raise ValueError(f"tiered gate needs 3 tier values; got {tiers}")
    t1, t2 = lower_quantile(w, alpha), lower_quantile(w, beta)
    return np.where(w <= t1, tiers[0], np.where(w <= t2, tiers[1], tiers[2]))


def continuous_gate(w: Any, *, gamma: float = 3.0, center: float = 1.0,
                    amplitude: float = 0.5) -> np.ndarray:
    """Continuous gate (Appendix A): ``s = 1 + amplitude * tanh(gamma * (w - center))``.

    Defaults ``gamma = 3``, ``center = 1``, ``amplitude = 0.5`` give the paper's
    ``1 + 0.5 tanh(3 (w - 1))``, so ``s`` lies in (0.5, 1.5).
    ``w``: ``[L]``; returns ``[L]`` float64.
    """
    w = _vec(w, "w")
    return 1.0 + amplitude * np.tanh(gamma * (w - center))
