"""SVC, singular value calibration of a merged delta (SPEC §5; Li, Peng et al., arXiv 2602.05536).

A post-processing of ``D_m`` (the base merger's delta INCLUDING its own coefficient), per matrix
leaf (the 2-D rule of :func:`larv_jax.merging.methods.takes_matrix_path`, ``[out, in]`` layout):
``D_m = U S V^T``; for direction r and task i, ``a_r^i = u_r^T tau_i``, ``a_r^m = S_r v_r^T``,
``s_r^i = <a_r^m, a_r^i> / max(||a_r^i||^2, 1e-12)`` (NaN or -inf -> alpha),
``gamma_r = K / sum_i max(s_r^i, alpha)``, ``S'_r = gamma_r S_r``. Every other leaf is returned
unchanged. Computed in float64 numpy (as FusionBench does in torch float64), output float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from larv_jax import tree
from larv_jax.merging import linalg
from larv_jax.merging.methods import _exclude, _flat, _matrix_map, takes_matrix_path

# SVC's alpha per base merger (SPEC §5; the SVC paper's values for averaging, TA, TIES, DARE-TA,
# Iso-C, Iso-CTS and TSV-M). ties_paper, dare_ties and dare_average are not in the paper: they
# take the 0.1 of their family.
SVC_ALPHA = {
    "simple_average": 0.1, "task_arithmetic": 0.1, "ties": 0.1, "ties_paper": 0.1,
    "dare_task_arithmetic": 0.1, "dare_ties": 0.1, "dare_average": 0.1, "iso_c": 0.1,
    "iso_cts": 0.2, "tsv_m": 1.0,
}


def svc_alpha(method: str) -> float:
    """The default SVC alpha of a base merger name (0.1 for a name not in :data:`SVC_ALPHA`)."""
    return SVC_ALPHA.get(method, 0.1)


def svc(delta: Mapping[str, Any], task_vectors: Mapping[str, Any], *, alpha: float = 0.1,
        exclude: Sequence[str] = (), inplace: bool = False,
        cluster_rtol: float = linalg.SVC_CLUSTER_RTOL) -> Any:
    """Calibrate the singular values of every matrix leaf of ``delta`` (``{path: D}``, Flax
    layout) against ``task_vectors`` (``{path: tau [K, ...]}``, may be lazy). Leaves of ``delta``
    that are not matrices (or match ``exclude``) are returned as they are (the same objects).
    ``inplace`` (flat dict ``delta`` only) replaces the entries of ``delta`` itself, so that the
    streaming engine never holds two merged models.

    Matrices whose spectrum has clusters of near-equal singular values (consecutive values equal
    to a relative ``cluster_rtol``; Iso-C's and Iso-CTS's spectra are flat) take the tasks' energy eigenbasis
    inside each cluster instead of the SVD's rounding-defined one (SPEC §5,
    :func:`larv_jax.merging.linalg.svc_matrix`); one warning per call says how many.
    """
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (SVC) must be a finite positive number; got {alpha!r}")
    if not (np.isfinite(cluster_rtol) and 0 <= cluster_rtol < 1):
        raise ValueError(f"cluster_rtol (SVC) must be in [0, 1); got {cluster_rtol!r}")
    flat, nested = _flat(delta)
    tv, _ = _flat(task_vectors)
    pats = _exclude(exclude)
    if inplace and (nested or not isinstance(delta, dict)):
        raise ValueError("svc(inplace=True) needs a flat dict delta")
    out = flat if inplace else {}
    clustered: list[tuple[str, int]] = []          # (path, directions in clusters), any thread

    def calibrate(path: str, t: np.ndarray, dm: np.ndarray) -> np.ndarray:
        res, n = linalg._svc_matrix(dm, t, alpha, cluster_rtol)
        if n:
            clustered.append((path, n))
        return res

    for path, d in list(flat.items()):
        d = np.asarray(d)
        if not takes_matrix_path(path, d.shape, pats):
            out[path] = flat[path]
            continue
        taus = np.asarray(tv[path], dtype=np.float32)
        if taus.shape[1:] != d.shape:
            raise ValueError(f"svc: task vectors of {path!r} have shape {taus.shape}, delta {d.shape}")
        out[path] = _matrix_map(path, taus, lambda t, dm, p=path: calibrate(p, t, dm),
                                extra=d.astype(np.float32))
    if clustered:
        leaves = sorted({p for p, _ in clustered})
        warnings.warn(
            f"SVC: {len(clustered)} matrices ({len(leaves)} leaves, e.g. {leaves[0]}) have "
            f"clusters of near-equal singular values ({sum(n for _, n in clustered)} directions "
            f"in all; equal to a relative {cluster_rtol:g}); inside each the tasks' energy eigenbasis "
            "replaces the SVD's arbitrary one (docs/SPEC.md §5)", stacklevel=2)
    return tree.unflatten(out) if nested else out
