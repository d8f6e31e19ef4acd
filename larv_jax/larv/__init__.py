"""LARV: the layer-wise veneer on top of any data-free merge (SPEC §3).

- :mod:`larv_jax.larv.gates`: z-score, depth prior, composite score ``w``, tiered and continuous
  gates (pure numpy functions on ``[L]`` vectors).
- :mod:`larv_jax.larv.schedules`: depth-only schedules, the one registry ``SCALERS`` and
  ``compute_scales(spec, e=, c=, ...)``.
- :mod:`larv_jax.larv.veneer`: ``larv_merge``, ``veneer.veneer`` (on a given delta),
  ``apply_scales`` (post and pre, SVC order), the per-unit report.
- :mod:`larv_jax.larv.mergers`: merging-registry names -> merger callables.
- :mod:`larv_jax.larv.grid`: experiment grids with diagnostics reuse (``larv run``).
- :mod:`larv_jax.larv.flags`: the ``--larv*`` flags for merge commands.

Importing this package is light (numpy); the jax-backed names below load on first use, so CLI
modules can import :mod:`larv_jax.larv.flags` while building the parser.
"""

from larv_jax.larv.gates import (
    composite_score,
    continuous_gate,
    depth_prior,
    lower_quantile,
    tiered_gate,
    zscore,
)
from larv_jax.larv.schedules import SCALERS, Scales, compute_scales, parse_options, parse_spec

_LAZY = {"larv_merge": "veneer", "apply_scales": "veneer",
         "UnitReport": "veneer", "LarvResult": "veneer", "run_grid": "grid"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"larv_jax.larv.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'larv_jax.larv' has no attribute {name!r}")


__all__ = [
    "SCALERS", "LarvResult", "Scales", "UnitReport", "apply_scales", "composite_score",
    "compute_scales", "continuous_gate", "depth_prior", "larv_merge", "lower_quantile",
    "parse_options", "parse_spec", "run_grid", "tiered_gate", "zscore",
]
