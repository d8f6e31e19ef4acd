"""Data-free model merging (SPEC §4, §5): pure functions, one registry, a streaming engine.

``METHODS[name](task_vectors, **hparams) -> delta``: ``task_vectors`` is ``{path: tau [K, ...]}``
(Flax layout, task axis first; nested dicts work too), ``delta`` is ``{path: D}`` with the method's
own coefficient included, so ``theta = theta0 + D`` (LARV: ``theta0 + s * D``). :func:`svc`
post-processes a delta. :func:`merge_delta` / :func:`merge_checkpoints` stream the same functions
over checkpoints on disk, one leaf (K slices) at a time. The registry (names, hyperparameters,
defaults, binding) is :mod:`larv_jax.merging.registry`.
"""

from larv_jax.merging.engine import (
    MergeResult,
    apply_delta,
    merge_checkpoints,
    merge_delta,
    task_vectors,
)
from larv_jax.merging.methods import (
    ISO_C_SCALES,
    dare,
    dare_average,
    dare_task_arithmetic,
    dare_ties,
    iso_c,
    iso_cts,
    simple_average,
    task_arithmetic,
    ties,
    ties_cuts,
    ties_paper,
    tsv_m,
)
from larv_jax.merging.registry import METHODS, bind, bind_svc, get_method, hparams
from larv_jax.merging.sources import LeafSource, TreeSource, open_source
from larv_jax.merging.stream import TaskVectors
from larv_jax.merging.svc import SVC_ALPHA, svc, svc_alpha

__all__ = [
    "ISO_C_SCALES", "METHODS", "SVC_ALPHA", "LeafSource", "MergeResult", "TaskVectors",
    "TreeSource", "apply_delta", "bind", "bind_svc", "dare", "hparams",
    "dare_average", "dare_task_arithmetic", "dare_ties", "get_method", "iso_c", "iso_cts",
    "merge_checkpoints", "merge_delta", "open_source", "simple_average", "svc",
    "svc_alpha", "task_arithmetic", "task_vectors", "ties", "ties_cuts", "ties_paper", "tsv_m",
]
