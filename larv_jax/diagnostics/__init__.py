"""LARV diagnostics engine (SPEC §1-2): units, kernels, sharded batched evaluation, writers.

Typical use::

    from larv_jax import diagnostics as dg
    from larv_jax.tree import flatten
    base, delta = flatten(theta0), flatten(merged_delta)        # Flax layout, stacked blocks
    us = dg.units({p: v.shape for p, v in base.items()})        # module granularity, L = 1+3B(+1)
    cache = dg.base_cache(base, us)                             # once per pretrained model
    diag = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(0), cache=cache)
    diag.e, diag.c                                               # [L] each, depth order
    dg.to_json(diag, "out/diagnostics.json"); dg.to_csv(diag, ...); dg.plot(diag, ..., s=s)
    scales = dg.unit_scales_to_tree(us, s, shapes)               # {path: [] or [B,1,..]}

Multi-host: call ``jax.distributed.initialize()`` on every host, then make the same calls with
the same inputs everywhere; the matrix axis is sharded over the global ``jax.devices()`` (see
``larv_jax.diagnostics.devices``). Modules: ``unit_rules`` (the units), ``buckets`` (shape
buckets and their staging), ``kernels`` (single-matrix kernels), ``devices`` (placement and
execution), ``store`` (the on-disk base cache), ``engine`` (``base_cache``, ``diagnose``),
``record`` (JSON / CSV / PNG).
"""

from larv_jax.diagnostics.buckets import Bucket, MatrixRef, plan_buckets
from larv_jax.diagnostics.engine import MODES, TRACES, BaseCache, base_cache, diagnose
from larv_jax.diagnostics.record import Diagnostics, MatrixDiag, plot, to_csv, to_json
from larv_jax.diagnostics.unit_rules import (
    GRANULARITIES,
    ROLE_RULES,
    Unit,
    param_shapes,
    unit_scales_to_tree,
    unit_table,
    units,
)

__all__ = [
    "GRANULARITIES", "MODES", "ROLE_RULES", "TRACES", "BaseCache", "Bucket", "Diagnostics",
    "MatrixDiag", "MatrixRef", "Unit", "base_cache", "diagnose", "param_shapes", "plan_buckets",
    "plot", "to_csv", "to_json", "unit_scales_to_tree", "unit_table", "units",
]
