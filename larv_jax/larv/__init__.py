"""LARV: the layer-wise veneer on top of any data-free merge (SPEC §3).

- :mod:`larv_jax.larv.gates`: z-score, depth prior, score ``w``, tiered and continuous gates.
- :mod:`larv_jax.larv.schedules`: depth-only schedules, the one registry ``SCALERS`` and
  ``compute_scales(spec, e=, c=, ...)``.
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

__all__ = [
    "SCALERS", "Scales", "composite_score", "compute_scales", "continuous_gate", "depth_prior",
    "lower_quantile", "parse_options", "parse_spec", "tiered_gate", "zscore",
]
