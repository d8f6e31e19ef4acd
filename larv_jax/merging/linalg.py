"""Float64 matrix kernels for the spectral mergers (TSV-M, Iso-C, Iso-CTS, SVC).

Every kernel takes one matrix in the PyTorch layout ``[out, in]`` (or ``[K, out, in]`` task
stacks) and computes in float64.

Two routes to the singular triplets (``docs/SPEC.md`` §4.0):

- **Gram route** (fast): the eigendecomposition of the float64 Gram matrix of the smaller side
  (``A = U S V^T`` with ``A^T A = V S^2 V^T``, ``U = A V / S``). On this project's 2-core CPU a
  float64 Gram + ``eigh`` of a 768 x 768 matrix takes 0.055-0.07 s against 0.13 s (768 x 768)
  and 0.31 s (3072 x 768) for numpy's float64 SVD, and numpy's ``eigh`` releases the GIL (see
  :func:`_eigh`). Squaring the matrix squares its condition number: the error of a polar factor
  (``U V^T``) taken this way grows as ``~1e-16 kappa^2`` (measured, relative to its largest
  entry, on 768 x 768 and 3072 x 768 matrices with geometric and two-level spectra:
  1e-8 at ``kappa = 1e4``, 1.6e-6 at 1e5, 4e-4 at 1e6).
- **SVD route** (exact to float64): LAPACK's ``gesdd`` (``numpy.linalg.svd``), within 1e-10 of
  LAPACK's ``gesvd`` up to ``kappa = 1e6`` on the same matrices.

A kernel takes the Gram route only when every singular value it needs lies at or above
``sigma_1 / GRAM_MAX_COND`` (so its error stays near 1e-8, a hundred times inside the 1e-6 the
project promises against float64 LAPACK), which the Gram's own eigenvalues tell (their absolute
error, ``~n eps sigma_1^2``, is far below that threshold). Otherwise it takes the SVD route: a
spectrum that Iso-C or TSV-M flattens gives every resolved direction the same weight, so a
direction the Gram route cannot resolve would cost ``mean(S)`` of output.

Exactly rank-deficient input: singular values at or below ``max(m, n) eps sigma_1`` (the
numerical rank rule of ``numpy.linalg.matrix_rank``; 1.7e-13 ``sigma_1`` for 768 x 768,
6.8e-13 for 3072 x 768, below the 1e-12 ``sigma_1`` down to which every direction counts) are
treated as exactly zero: their singular vectors are undefined, both the left and the right
vectors returned for them are 0 (so ``svd(a)`` and ``svd(a.T)`` agree), and a polar factor is
the partial isometry that is zero on the null space (an SVD alone would pick an arbitrary,
rounding-defined completion). The zero matrix gives all-zero factors.
"""

from __future__ import annotations

import numpy as np

from larv_jax.arrays import contiguous

_EPS = np.finfo(np.float64).eps

# The largest sigma_1 / sigma_k for which the Gram route gives sigma_k's triplet (module docstring).
GRAM_MAX_COND = 1e4


def _null_cutoff(s0: float, m: int, n: int) -> float:
    """Singular values at or below this are exactly zero (numerical rank rule)."""
    return s0 * max(m, n) * _EPS


def _gram_resolves(s: np.ndarray, k: int) -> bool:
    """Whether the Gram route's ``s`` (descending) resolves the top ``k`` triplets."""
    return k == 0 or s[0] == 0.0 or s[k - 1] >= s[0] / GRAM_MAX_COND


def _lapack_svd(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` triplets of a float64 ``a`` by LAPACK ``gesdd``, null directions zeroed."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    null = s <= _null_cutoff(s[0] if s.size else 0.0, *a.shape)
    if null.any():
        s = np.where(null, 0.0, s)
        u, vt = u.copy(), vt.copy()
        u[:, null] = 0.0
        vt[null] = 0.0
    return u, s, vt


def _eigh(g: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (all when None) eigenpairs of a symmetric matrix, descending.

    ``numpy.linalg.eigh`` (LAPACK ``syevd``), not scipy's subset drivers: numpy's linalg
    releases the GIL, so the engine's threads (one per stacked block) run in parallel, while
    scipy's ``syevr`` wrapper holds it. Measured on the 2-core CPU, 768 x 768 float64:
    numpy 0.071 s per call serially, 0.036 s per call with 2 threads; scipy ``evr`` top-96
    0.051 s per call, no faster with 2 threads.
    """
    lam, v = np.linalg.eigh(g)
    if k is not None:
        lam, v = lam[g.shape[0] - k:], v[:, g.shape[0] - k:]
    return lam[::-1], v[:, ::-1]


def svd(a: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets of ``a [m, n]`` (all ``min(m, n)`` when None), float64.

    Returns ``U [m, k]``, ``S [k]`` (descending), ``Vt [k, n]``.
    """
    a = np.asarray(a, dtype=np.float64)
    m, n = a.shape
    if m < n:
        u, s, vt = svd(a.T, k)
        return vt.T, s, u.T
    k = n if k is None else min(int(k), n)
    if k <= 0:
        return np.zeros((m, 0)), np.zeros((0,)), np.zeros((0, n))
    lam, v = _eigh(a.T @ a, k)
    s = np.sqrt(np.clip(lam, 0.0, None))
    if not _gram_resolves(s, k):
        return _lapack_svd(a, k)
    good = s > (s[0] if s.size else 0.0) * np.sqrt(n * _EPS)
    s = np.where(good, s, 0.0)
    u = (a @ v) / np.where(good, s, 1.0)
    if not good.all():                           # only the zero matrix gets here (s[0] == 0)
        u[:, ~good] = 0.0
        v = v * good
    return u, s, v.T


def polar(a: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor ``P Q^T`` of ``a [m, p]`` (``a = P S Q^T``), ``p <= m``, float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape[1] > a.shape[0]:
        return polar(a.T).T
    if a.shape[1] == 0:
        return a.copy()
    lam, w = _eigh(a.T @ a, None)
    s = np.sqrt(np.clip(lam, 0.0, None))
    if not _gram_resolves(s, s.size):
        u, s, vt = _lapack_svd(a, a.shape[1])
        return u @ vt                            # null columns of u are 0: a partial isometry
    good = s > (s[0] if s.size else 0.0) * np.sqrt(a.shape[1] * _EPS)
    return a @ _inv_sqrt(w, s, good)


def _inv_sqrt(w: np.ndarray, s: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``W diag(1/s) W^T`` over the ``good`` singular values (0 elsewhere): ``(A^T A)^(-1/2)``
    from its eigenvectors ``W`` and the singular values ``s``. Formed as ``X X^T`` with
    ``X = W diag(s^(-1/2))``, which numpy computes with a symmetric rank-k update (half the
    flops of a general product)."""
    x = w * np.where(good, 1.0 / np.sqrt(np.where(good, s, 1.0)), 0.0)
    return x @ x.T


def iso_c_matrix(taus: np.ndarray) -> np.ndarray:
    """Iso-C for one matrix: ``M = sum_k taus[k] = U S V^T`` -> ``mean(S) U V^T`` (``[m, n]``).

    ``U V^T`` is the polar factor ``M (M^T M)^(-1/2)`` (of the tall view), so one float64 Gram
    eigendecomposition gives both it and ``mean(S)``: no ``U`` is formed.
    """
    taus = np.asarray(taus)
    if taus.shape[0] == 1 and taus.dtype == np.float64:
        m = taus[0]                              # already the (float64) sum: no copy
    else:
        m = np.sum(taus, axis=0, dtype=np.float64)
    if m.shape[0] < m.shape[1]:
        return iso_c_matrix_tall(m.T).T
    return iso_c_matrix_tall(m)


def iso_c_matrix_tall(m: np.ndarray) -> np.ndarray:
    """:func:`iso_c_matrix` of a summed float64 ``m [rows, n]``, ``rows >= n``."""
    if m.shape[1] == 0:
        return np.zeros_like(m)
    lam, w = _eigh(m.T @ m, None)
    s = np.sqrt(np.clip(lam, 0.0, None))
    if not _gram_resolves(s, s.size):
        u, s, vt = _lapack_svd(m, m.shape[1])
        return np.mean(s) * (u @ vt)
    good = s > (s[0] if s.size else 0.0) * np.sqrt(m.shape[1] * _EPS)
    return np.mean(np.where(good, s, 0.0)) * (m @ _inv_sqrt(w, s, good))


def tsv_m_matrix(taus: np.ndarray) -> np.ndarray:
    """TSV-M for one matrix: top ``floor(r/K)`` triplets per task, polar factors of the
    concatenated bases, ``U_perp diag(sigma_bar) V_perp^T``."""
    taus = np.asarray(taus, dtype=np.float64)
    num, m, n = taus.shape
    k = min(m, n) // num
    if k == 0:
        return np.zeros((m, n))
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vt = svd(t, k)
        us.append(u), ss.append(s), vs.append(vt.T)
    u_perp = polar(np.concatenate(us, axis=1))
    v_perp = polar(np.concatenate(vs, axis=1))
    return (u_perp * np.concatenate(ss)) @ v_perp.T


def iso_cts_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(c, d)``: common-subspace size and per-task size for rank ``r`` (SPEC §4, Python round)."""
    c0 = int(np.floor(r * common_fraction))
    s = int(round((r - c0) / num_tasks)) * num_tasks
    c = r - s
    return c, (r - c) // num_tasks


def iso_cts_matrix(taus: np.ndarray, common_fraction: float) -> np.ndarray:
    """Iso-CTS for one matrix (before the global ``lam``)."""
    taus = np.asarray(taus, dtype=np.float64)
    num, m, n = taus.shape
    c, d = iso_cts_sizes(min(m, n), num, common_fraction)
    uc, sc, vtc = svd(np.sum(taus, axis=0), c)
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vt = svd(t - uc @ (uc.T @ t), d)
        us.append(u), ss.append(s), vs.append(vt.T)
    us.append(uc), ss.append(sc), vs.append(vtc.T)
    s_all = np.concatenate(ss)
    if not s_all.size:
        return np.zeros((m, n))
    u_perp = polar(np.concatenate(us, axis=1))
    v_perp = polar(np.concatenate(vs, axis=1))
    return np.mean(s_all) * (u_perp @ v_perp.T)


# Consecutive singular values equal to this relative tolerance form a cluster
# (SVC's basis inside it is then the tasks' energy eigenbasis; docs/SPEC.md §5).
SVC_CLUSTER_RTOL = 1e-5


def singular_clusters(s: np.ndarray, rtol: float = SVC_CLUSTER_RTOL) -> list[tuple[int, int]]:
    """Index ranges ``[j, k)`` (``k - j >= 2``) of runs of consecutive nonzero singular values
    ``s`` (descending) whose neighbours are equal to a relative ``rtol``: ``s[r] - s[r + 1] <=
    rtol * s[r]`` (chained: a run may span more than ``rtol`` in all). Relative to the values
    themselves, not to ``sigma_1``, so that a decaying tail of distinct small values (a noise
    bulk, whose neighbours are close in absolute terms) is no cluster. Zero singular values (null
    directions) belong to none."""
    s = np.asarray(s, dtype=np.float64)
    if s.size < 2 or s[0] <= 0.0:
        return []
    close = (s[:-1] - s[1:] <= rtol * s[:-1]) & (s[1:] > 0.0)
    out, j = [], None
    for r, c in enumerate(close):
        if c and j is None:
            j = r
        elif not c and j is not None:
            out.append((j, r + 1))
            j = None
    if j is not None:
        out.append((j, s.size))
    return out


def svc_matrix(merged: np.ndarray, taus: np.ndarray, alpha: float,
               cluster_rtol: float = SVC_CLUSTER_RTOL) -> np.ndarray:
    """Singular value calibration of one merged delta ``[m, n]`` against ``taus [K, m, n]``.

    ``s_r^i = <S_r v_r, u_r^T tau_i> / max(||u_r^T tau_i||^2, 1e-12)`` (NaN / -inf -> alpha),
    ``gamma_r = K / sum_i max(s_r^i, alpha)``, ``S'_r = gamma_r S_r``.

    Inside a cluster of (near-)equal singular values (:func:`singular_clusters`; Iso-C's and
    Iso-CTS's flat spectra are one cluster) the SVD's basis is arbitrary, defined by rounding:
    there the directions are the eigenvectors (descending) of the tasks' energy inside the
    cluster's left space, ``U_c^T (sum_i tau_i tau_i^T) U_c``, and ``D' = sum_r gamma_r u_r
    (u_r^T D)`` (which is ``U diag(gamma S) V^T`` outside clusters). Their projections are
    float64 (a float32 product's 1e-7 would move the eigenbasis by 1e-7 / gap). Without clusters
    the result is exactly that of the plain formula.
    """
    return _svc_matrix(merged, taus, alpha, cluster_rtol)[0]


def _svc_matrix(merged: np.ndarray, taus: np.ndarray, alpha: float, cluster_rtol: float,
                basis: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, int]:
    """:func:`svc_matrix` and the number of directions inside clusters. ``basis``: the SVD of
    ``merged`` to use instead of computing one (tests rotate it inside a cluster)."""
    dm = np.asarray(merged, dtype=np.float64)
    u, s, vt = svd(dm) if basis is None else basis
    a_m = s[:, None] * vt                                    # rows u_r^T D_m = S_r v_r^T
    clusters = singular_clusters(s, cluster_rtol)
    inc = np.zeros(s.size, bool)
    for j, k in clusters:
        inc[j:k] = True
    if clusters:
        # first pass: each cluster's energy, then its eigenbasis replaces the SVD's (u's columns
        # and a_m's rows rotated alike, so sum_r u_r a_m_r = D is kept)
        u, a_m = u.copy(), a_m.copy()
        energy = [np.zeros((k - j, k - j)) for j, k in clusters]
        for t in taus:
            t64 = contiguous(t, np.float64)
            for e, (j, k) in zip(energy, clusters, strict=True):
                p = u[:, j:k].T @ t64
                e += p @ p.T
        for e, (j, k) in zip(energy, clusters, strict=True):
            rot = _eigh(e, None)[1]
            u[:, j:k] = u[:, j:k] @ rot
            a_m[j:k] = rot.T @ a_m[j:k]
        u64t = np.ascontiguousarray(u.T[inc])
    # The K projections u^T tau_i are the bulk of the work (K r m n flops): float32 products of
    # the float32 task vectors (relative error ~1e-7 in the ratios below), accumulated in float64;
    # inside clusters float64 products (a float32 product's 1e-7 would move the basis by 1e-7/gap)
    u32t = np.ascontiguousarray(u.T[~inc] if clusters else u.T, dtype=np.float32)
    ratios = []
    for t in taus:                                           # one task at a time
        # a C-contiguous operand whatever the caller's memory order: the same BLAS call, so the
        # same float32 rounding, for a streamed (native-order) and an in-memory leaf
        a_i = (u32t @ contiguous(t, np.float32)).astype(np.float64)  # rows u_r^T tau_i
        if clusters:
            full = np.empty((s.size, a_i.shape[1]))
            full[~inc] = a_i
            full[inc] = u64t @ contiguous(t, np.float64)
            a_i = full
        num = np.einsum("rn,rn->r", a_m, a_i)
        den = np.maximum(np.einsum("rn,rn->r", a_i, a_i), 1e-12)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append(num / den)
    ratio = np.stack(ratios)
    ratio = np.where(np.isnan(ratio) | np.isneginf(ratio), alpha, ratio)
    gamma = taus.shape[0] / np.sum(np.maximum(ratio, alpha), axis=0)
    if not clusters:
        return (u * (gamma * s)) @ vt, 0
    return (u * gamma) @ a_m, int(inc.sum())
