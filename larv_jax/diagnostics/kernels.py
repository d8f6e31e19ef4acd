"""LARV diagnostic kernels (SPEC §2, the paper's Eqs. 5-7) as plain functions of ONE matrix.

Everything here is written for a single matrix in the PyTorch orientation ``[out, in]`` and is
meant to be lifted with ``jax.vmap`` and jit-compiled by the caller (``larv_jax.diagnostics.engine``
owns the ``jit``). No function here picks a device, prints or reads a config.

Definitions (SPEC §2): energies p_j = sigma_j^2 / ||A||_F^2, entropy H = -sum p_j log p_j
(0 log 0 = 0), effective rank r_eff = exp(H); contrast e = r_eff(theta0) / (r_eff(D) + eps), 0 when
||D||_F is numerically 0; commutator conflict c (Eq. 6 for square pairs, Eq. 7 for rectangular).

Singular values, entropies and both Gram commutators are invariant under swapping
``A -> A^T, D -> D^T`` together, so callers may transpose wide matrices to tall ones (``m >= n``)
and batch them with same-shaped tall ones; the Gram kernels below assume tall inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8


def gram(a: jax.Array) -> jax.Array:
    """Gram of the smaller side: ``A^T A`` [n, n] for tall ``A`` [m, n], else ``A A^T``."""
    m, n = a.shape
    return a.T @ a if m >= n else a @ a.T


def entropy_from_energies(lam: jax.Array, total: jax.Array | None = None) -> jax.Array:
    """Shannon entropy of ``p = lam / total`` (lam >= 0; ``total`` defaults to ``sum(lam)``).

    0 log 0 = 0; an all-zero spectrum has entropy 0.
    """
    total = jnp.sum(lam) if total is None else total
    safe_total = jnp.where(total > 0, total, 1.0)
    p = lam / safe_total
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.where(total > 0, -jnp.sum(plogp), 0.0)


def sym_eigvals(g: jax.Array) -> jax.Array:
    """Eigenvalues (ascending) of a symmetric ``g`` [n, n].

    Householder tridiagonalisation (LAPACK ``sytrd``) then bisection on the tridiagonal
    (``jax.scipy.linalg.eigh_tridiagonal``): no eigenvectors. ``jnp.linalg.eigvalsh`` computes
    eigenvectors on CPU and was measured several times slower on 768 x 768.
    """
    if g.shape[-1] == 1:
        return g.reshape(1)
    _, d, e, _ = jax.lax.linalg.tridiagonal(g, lower=True)
    return jnp.sort(jax.scipy.linalg.eigh_tridiagonal(d, e, eigvals_only=True))


def gram_entropy(g: jax.Array) -> jax.Array:
    """Exact spectral entropy from a Gram matrix ``G = A^T A``: eigenvalues clipped at 0."""
    lam = jnp.clip(sym_eigvals(g), 0.0, None)
    return entropy_from_energies(lam)


def exact_entropy(a: jax.Array) -> jax.Array:
    """Exact spectral entropy of ``A`` [m, n] via the eigenvalues of the smaller Gram."""
    return gram_entropy(gram(a))


def psd_eigvals(g: jax.Array) -> jax.Array:
    """Eigenvalues (descending) of a small symmetric PSD ``g`` [k, k], as its singular values.

    LAPACK ``gesdd`` without vectors: measured ~25x faster on this CPU than ``eigvalsh`` (which
    computes eigenvectors) at k = 74. (In an SPMD program on 2 fake CPU devices, mixing it with
    the Cholesky of :func:`orthonormalize` hung; see ``larv_jax.diagnostics.engine``.)
    """
    return jnp.linalg.svd(0.5 * (g + g.T), compute_uv=False)


def _lower_tri_inv(lo: jax.Array) -> jax.Array:
    """Inverse of a lower-triangular ``lo`` [k, k]: one triangular solve against the identity.

    Measured on this CPU (batch of 48, k = 74): 1.3 ms, against 8 ms for a matmul-only
    Newton-Schulz inverse and 12 ms for solving ``Y L^-T`` against the tall ``Y`` directly.
    """
    eye = jnp.eye(lo.shape[0], dtype=lo.dtype)
    return jax.lax.linalg.triangular_solve(lo, eye, left_side=True, lower=True)


def _cholqr_pass(y: jax.Array, rel_shift: float) -> jax.Array:
    g = y.T @ y
    k = g.shape[0]
    shift = rel_shift * jnp.max(jnp.diagonal(g)) + jnp.finfo(y.dtype).tiny * 1e8
    lo = jnp.linalg.cholesky(g + shift * jnp.eye(k, dtype=y.dtype))  # g + shift I = lo lo^T
    return y @ _lower_tri_inv(lo).T


def orthonormalize(y: jax.Array) -> jax.Array:
    """Orthonormal basis ``Q`` [m, k] of the columns of ``y`` [m, k] (the Q of a thin QR).

    Shifted CholeskyQR3 (Fukaya et al. 2020): three Cholesky-QR passes, the first with a shift
    of 1e-5 max diag(Y^T Y), the others 1e-7 so that rank-deficient sketches (exactly low-rank
    updates, zero padding) stay finite; a shifted pass never increases column norms, so
    Rayleigh-Ritz energies are never overcounted. Matmul-bound (a k x k Cholesky and triangular
    inverse, two m x k x k products per pass), unlike LAPACK ``geqrf`` through ``jnp.linalg.qr``,
    which was measured 10-100x slower on this CPU for 768 x 74 and 3072 x 74.
    """
    y = _cholqr_pass(y, 1e-5)
    y = _cholqr_pass(y, 1e-7)
    return _cholqr_pass(y, 1e-7)


def recondition(y: jax.Array) -> jax.Array:
    """One shifted Cholesky-QR pass: a well-conditioned (nearly orthonormal) basis of ``y``.

    The re-orthonormalisation between power-iteration half steps: it only has to stop the
    columns from collapsing onto the top singular direction (one pass brings the condition
    number down to about ``1/sqrt(1e-5)``, whatever it was); the basis the Rayleigh-Ritz step
    uses is made orthonormal to working precision by :func:`orthonormalize`.
    """
    return _cholqr_pass(y, 1e-5)


def randomized_svdvals(a: jax.Array, key: jax.Array, *, k: int = 64, p: int = 10,
                       q: int = 2) -> jax.Array:
    """Top ``k' = min(k + p, min(m, n))`` singular values of ``A`` [m, n] by a randomized SVD.

    Halko-Martinsson-Tropp range finder: Gaussian sketch ``Omega`` [n, k'] drawn from ``key``,
    ``Y = A Omega``, then ``q`` power iterations ``Y = A rc(A^T rc(Y))`` re-orthonormalised at
    every half step (``rc`` = :func:`recondition`, one shifted Cholesky-QR pass), ``Q =
    orth(Y)`` (:func:`orthonormalize`, CholeskyQR3), and the singular values of the small
    ``Q^T A`` [k', n] (square roots of the eigenvalues of its k' x k' Gram).
    Returns ``[k']`` in descending order.
    """
    m, n = a.shape
    kk = min(k + p, m, n)
    omega = jax.random.normal(key, (n, kk), a.dtype)
    y = a @ omega
    for _ in range(q):  # q is small and static: unrolled (measured faster than a fori_loop)
        y = a @ recondition(a.T @ recondition(y))
    qm = orthonormalize(y)
    b = qm.T @ a
    return jnp.sqrt(psd_eigvals(b @ b.T))


def randomized_gram_eigvals(g: jax.Array, key: jax.Array, *, k: int = 64, p: int = 10,
                            q: int = 2) -> jax.Array:
    """Top ``k' = min(k + p, n)`` eigenvalues of a PSD Gram ``G = A^T A`` [n, n], randomized.

    The same range finder run on ``G``: ``Y = G Omega``, ``q`` re-orthonormalised power steps
    ``Y = G rc(Y)`` (:func:`recondition`), ``Q = orth(Y)``, Rayleigh-Ritz ``eig(Q^T G Q)``. The sketch spans
    ``(A^T A)^(q+1) Omega``, one degree more than the matrix version's ``(A A^T)^q A Omega``,
    at n x n x k' cost instead of m x n x k' (used when ``G`` is at hand anyway).
    Returns sigma_j^2 ``[k']`` in descending order.
    """
    n = g.shape[0]
    kk = min(k + p, n)
    omega = jax.random.normal(key, (n, kk), g.dtype)
    y = g @ omega
    for _ in range(q):
        y = g @ recondition(y)
    qm = orthonormalize(y)
    return psd_eigvals(qm.T @ (g @ qm))


def completed_entropy(head_energy: jax.Array, total: jax.Array, big_n: int) -> jax.Array:
    """SPEC §2 tail completion: ``H ~ H_head + t log((N - k') / t)`` with ``t = 1 - sum p_head``.

    ``head_energy`` [k'] are sigma_j^2 (j <= k'), ``total = ||A||_F^2`` (exact), ``big_n`` =
    min(m, n). 0 for an all-zero matrix.
    """
    kk = head_energy.shape[0]
    safe_total = jnp.where(total > 0, total, 1.0)
    head = head_energy / safe_total
    h_head = entropy_from_energies(head, jnp.asarray(1.0, head.dtype))
    if big_n - kk <= 0:
        return jnp.where(total > 0, h_head, 0.0)
    t = jnp.clip(1.0 - jnp.sum(head), 0.0, 1.0)
    safe_t = jnp.where(t > 0, t, 1.0)
    tail = jnp.where(t > 0, t * jnp.log((big_n - kk) / safe_t), 0.0)
    return jnp.where(total > 0, h_head + tail, 0.0)


def randomized_entropy(a: jax.Array, key: jax.Array, *, k: int = 64, p: int = 10,
                       q: int = 2) -> jax.Array:
    """Spectral entropy of ``A`` [m, n] from a randomized SVD with SPEC §2's tail completion.

    With exact ``||A||_F^2``, head energies p_j (j <= k') and tail mass t = 1 - sum p_j, the
    missing N - k' directions (N = min(m, n)) share t uniformly:
    ``H ~ H_head + t log((N - k') / t)``. Accurate for low-rank-plus-noise updates, biased high
    on flat spectra (see SPEC §2), which is why theta0 defaults to the exact entropy.
    """
    sv = randomized_svdvals(a, key, k=k, p=p, q=q)
    return completed_entropy(jnp.square(sv), jnp.sum(jnp.square(a)), min(a.shape))


def randomized_gram_entropy(g: jax.Array, key: jax.Array, *, k: int = 64, p: int = 10,
                            q: int = 2) -> jax.Array:
    """:func:`randomized_entropy` of ``A`` computed from its Gram ``G = A^T A`` [n, n]
    (:func:`randomized_gram_eigvals`; ``||A||_F^2 = tr G``)."""
    lam = randomized_gram_eigvals(g, key, k=k, p=p, q=q)
    return completed_entropy(lam, jnp.trace(g), g.shape[0])


def contrast(reff_base: jax.Array, reff_delta: jax.Array, norm_base: jax.Array,
             norm_delta: jax.Array, *, eps: float = EPS, zero_rtol: float = 1e-7) -> jax.Array:
    """Effective-rank contrast ``e = r_eff(theta0) / (r_eff(D) + eps)`` (Eq. 5).

    ``e = 0`` when ``||D||_F`` is numerically 0: ``||D||_F <= zero_rtol * ||theta0||_F`` (below the
    float32 resolution of ``theta0 + D``) or exactly 0.
    """
    is_zero = (norm_delta <= zero_rtol * norm_base) | (norm_delta <= 0)
    return jnp.where(is_zero, 0.0, reff_base / (reff_delta + eps))


def square_commutator(a: jax.Array, d: jax.Array, *, eps: float = EPS) -> jax.Array:
    """Eq. 6 for square ``A, D`` [n, n]: ``||A D - D A||_F / (||A||_F ||D||_F + eps)``."""
    num = jnp.linalg.norm(a @ d - d @ a)
    return num / (jnp.linalg.norm(a) * jnp.linalg.norm(d) + eps)


def gram_commutator_from_grams(g_a: jax.Array, g_d: jax.Array, y: jax.Array, norm_a: jax.Array,
                               norm_d: jax.Array, *, eps: float = EPS) -> jax.Array:
    """Eq. 7 from n x n pieces ``G_A = A^T A``, ``G_D = D^T D``, ``Y = A^T D``.

    ``||A D^T - D A^T||^2 = 2<G_A, G_D> - 2 tr(Y^2)`` and ``||A^T D - D^T A||^2 = 2||Y||^2 -
    2 tr(Y^2)``, each clipped at 0 before the square root. In float32 the left term carries an
    absolute error of about 1e-7 * ||A||^2 ||D||^2 (cancellation), i.e. ~3e-4 in c.
    """
    tr_y2 = jnp.sum(y * y.T)
    left = jnp.sqrt(jnp.clip(2.0 * jnp.sum(g_a * g_d) - 2.0 * tr_y2, 0.0, None))
    right = jnp.sqrt(jnp.clip(2.0 * jnp.sum(y * y) - 2.0 * tr_y2, 0.0, None))
    den = norm_a * norm_d + eps
    return 0.5 * left / den + 0.5 * right / den


def gram_commutator(a: jax.Array, d: jax.Array, g_a: jax.Array | None = None, *,
                    eps: float = EPS) -> jax.Array:
    """Eq. 7 for tall ``A, D`` [m, n] (m >= n) through n x n Grams; never forms an m x m product.

    ``c = 0.5 ||A D^T - D A^T||_F / (||A|| ||D|| + eps) + 0.5 ||A^T D - D^T A||_F / (...)``.
    ``g_a = A^T A`` may be passed in (it depends only on theta0).
    """
    m, n = a.shape
    if m < n:
        raise ValueError(f"gram_commutator needs a tall matrix (m >= n); got {a.shape}: transpose "
                         "A and D together")
    g_a = a.T @ a if g_a is None else g_a
    return gram_commutator_from_grams(g_a, d.T @ d, a.T @ d, jnp.linalg.norm(a),
                                      jnp.linalg.norm(d), eps=eps)


def commutator(a: jax.Array, d: jax.Array, *, eps: float = EPS) -> jax.Array:
    """Commutator conflict of a pair: Eq. 6 if square, else Eq. 7 (transposing wide pairs)."""
    m, n = a.shape
    if m == n:
        return square_commutator(a, d, eps=eps)
    if m < n:
        a, d = a.T, d.T
    return gram_commutator(a, d, eps=eps)
