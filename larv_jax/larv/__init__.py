"""LARV: the layer-wise veneer on top of any data-free merge (SPEC §3).

- :mod:`larv_jax.larv.gates`: z-score, depth prior, composite score ``w``, tiered and continuous
  gates (pure numpy functions on ``[L]`` vectors).
- :mod:`larv_jax.larv.schedules`: depth-only schedules, the one registry ``SCALERS`` and
  ``compute_scales(spec, e=, c=, ...)``.
- :mod:`larv_jax.larv.plan`: the one LARV entry, ``plan(base, delta, gate=...)`` (units, e, c,
  z, w, s) and ``apply(base, delta, plan)`` (theta0 + s * D; post, pre, SVC order).
- :mod:`larv_jax.larv.grid`: experiment grids, a loop over plan / apply (``larv run``,
  ``larv demo``).

Importing this package is light (numpy); the jax-backed names below load on first use.
"""

from larv_jax.larv.gates import (
    composite_score,
    continuous_gate,
    depth_prior,
    lower_quantile,
    tiered_gate,
    zscore,
)
from larv_jax.larv.schedules import SCALERS, Scales, compute_scales, parse_spec

# ``plan`` and ``apply`` themselves: ``from larv_jax.larv.plan import plan, apply`` (a package
# attribute ``plan`` is the submodule once it is imported).
_LAZY = {"Plan": "plan", "UnitReport": "plan", "run_grid": "grid"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"larv_jax.larv.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'larv_jax.larv' has no attribute {name!r}")


__all__ = [
    "SCALERS", "Plan", "Scales", "UnitReport", "composite_score", "compute_scales",
    "continuous_gate", "depth_prior", "lower_quantile", "parse_spec", "run_grid", "tiered_gate",
    "zscore",
]
