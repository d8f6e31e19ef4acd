"""LARV diagnostic kernels vs plain numpy references (full SVD, explicit commutator products)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larv_jax.diagnostics import kernels as K


def _np_entropy(a):
    s = np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
    if not s.any():
        return 0.0
    p = s**2 / np.sum(s**2)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def _np_commutator(a, d, eps=1e-8):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(d) + eps
    if a.shape[0] == a.shape[1]:
        return np.linalg.norm(a @ d - d @ a) / den
    left = np.linalg.norm(a @ d.T - d @ a.T)
    right = np.linalg.norm(a.T @ d - d.T @ a)
    return 0.5 * left / den + 0.5 * right / den


def _lowrank(rng, m, n, r=8, noise=0.05):
    x = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
    return (x + noise * rng.standard_normal((m, n))).astype(np.float32)


def _cases():
    rng = np.random.default_rng(0)
    return {
        "gauss_96x96": rng.standard_normal((96, 96)).astype(np.float32),
        "gauss_160x48": rng.standard_normal((160, 48)).astype(np.float32),
        "lowrank_48x160": _lowrank(rng, 48, 160),
        "lowrank_128x128": _lowrank(rng, 128, 128, r=4, noise=0.01),
        "powerlaw_120x80": (np.linalg.qr(rng.standard_normal((120, 80)))[0]
                            * (np.arange(1, 81) ** -1.0)
                            @ np.linalg.qr(rng.standard_normal((80, 80)))[0]).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_exact_entropy_matches_numpy_svd(name):
    a = _cases()[name]
    h = float(jax.jit(K.exact_entropy)(a))
    assert h == pytest.approx(_np_entropy(a), rel=2e-4, abs=1e-4)


def test_sym_eigvals_and_psd_eigvals_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((70, 50)).astype(np.float32)
    g = x.T @ x
    ref = np.linalg.eigvalsh(g.astype(np.float64))
    np.testing.assert_allclose(np.asarray(jax.jit(K.sym_eigvals)(g)), ref, rtol=1e-4,
                               atol=1e-4 * ref.max())
    np.testing.assert_allclose(np.asarray(jax.jit(K.psd_eigvals)(g)), ref[::-1], rtol=1e-4,
                               atol=1e-4 * ref.max())


def test_orthonormalize_spans_columns_and_is_orthonormal():
    rng = np.random.default_rng(2)
    y = (rng.standard_normal((300, 40)) * np.logspace(0, -3, 40)).astype(np.float32)
    q = np.asarray(jax.jit(K.orthonormalize)(y), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(40), atol=2e-5)
    # Projection of y onto span(q) recovers y (same column space).
    resid = y - q @ (q.T @ y)
    assert np.linalg.norm(resid) <= 1e-4 * np.linalg.norm(y)
    # A rank-deficient input stays finite and never overcounts (||Q|| <= 1).
    y0 = np.concatenate([y[:, :5], np.zeros((300, 35), np.float32)], axis=1)
    q0 = np.asarray(jax.jit(K.orthonormalize)(y0))
    assert np.isfinite(q0).all() and np.linalg.norm(q0, 2) <= 1 + 1e-5


@pytest.mark.parametrize("name", ["lowrank_48x160", "lowrank_128x128", "gauss_160x48"])
def test_randomized_svdvals_match_top_singular_values(name):
    a = _cases()[name]
    sv = np.asarray(jax.jit(lambda a, k: K.randomized_svdvals(a, k, k=16, p=8, q=2))(
        a, jax.random.PRNGKey(0)))
    ref = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert sv.shape == (min(24, *a.shape),)
    # Top-k of a low-rank-plus-noise matrix: essentially exact; never above the truth.
    np.testing.assert_allclose(sv[:4], ref[:4], rtol=2e-3 if "lowrank" in name else 0.1)
    assert np.all(sv <= ref[: len(sv)] * (1 + 1e-4) + 1e-5)


def test_randomized_gram_eigvals_match_top_eigenvalues():
    a = _cases()["lowrank_48x160"].T  # tall 160 x 48
    lam = np.asarray(jax.jit(lambda g, k: K.randomized_gram_eigvals(g, k, k=16, p=8))(
        K.gram(jnp.asarray(a)), jax.random.PRNGKey(3)))
    ref = np.linalg.svd(a.astype(np.float64), compute_uv=False) ** 2
    np.testing.assert_allclose(lam[:8], ref[:8], rtol=2e-3)


def test_randomized_entropy_with_full_sketch_is_exact():
    # k' >= min(m, n): the sketch spans everything, no tail, so it must equal the exact entropy.
    a = _cases()["gauss_160x48"]
    h = float(jax.jit(lambda a, k: K.randomized_entropy(a, k, k=48, p=0))(a, jax.random.PRNGKey(0)))
    assert h == pytest.approx(_np_entropy(a), rel=1e-4)


def test_tail_completion_hand_computed():
    # Energies 4, 2 in the head, total 8, N = 6: t = 0.25, H = H_head + 0.25 log(4 / 0.25).
    h = float(K.completed_entropy(jnp.array([4.0, 2.0]), jnp.asarray(8.0), 6))
    expect = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25)) + 0.25 * np.log(4 / 0.25)
    assert h == pytest.approx(expect, rel=1e-6)
    # Equals the exact entropy when the tail really is flat.
    spectrum = np.array([4.0, 2.0, 0.5, 0.5, 0.5, 0.5])
    p = spectrum / spectrum.sum()
    assert h == pytest.approx(-np.sum(p * np.log(p)), rel=1e-6)


@pytest.mark.parametrize("name", list(_cases()))
def test_commutators_match_explicit_products(name):
    rng = np.random.default_rng(4)
    a = _cases()[name]
    d = (0.1 * rng.standard_normal(a.shape) + 0.5 * a).astype(np.float32)
    c = float(jax.jit(K.commutator)(a, d))
    assert c == pytest.approx(_np_commutator(a, d), rel=2e-3, abs=5e-4)


def test_gram_commutator_uses_cached_gram_and_rejects_wide():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((200, 40)).astype(np.float32)
    d = _lowrank(rng, 200, 40, r=3)
    g_a = a.T @ a
    c = float(jax.jit(K.gram_commutator)(a, d, g_a))
    assert c == pytest.approx(_np_commutator(a, d), rel=2e-3)
    with pytest.raises(ValueError, match="tall"):
        K.gram_commutator(a.T, d.T)


def test_transpose_symmetry_claim():
    """Singular values, entropies and both Gram commutators are invariant under A->A^T, D->D^T
    together (what lets wide matrices share a bucket with tall ones), checked in numpy."""
    rng = np.random.default_rng(6)
    for m, n in [(64, 64), (96, 40)]:
        a = rng.standard_normal((m, n))
        d = _lowrank(rng, m, n).astype(np.float64)
        np.testing.assert_allclose(np.linalg.svd(a, compute_uv=False),
                                   np.linalg.svd(a.T, compute_uv=False), rtol=1e-12)
        assert _np_entropy(d) == pytest.approx(_np_entropy(d.T), rel=1e-12)
        assert _np_commutator(a, d) == pytest.approx(_np_commutator(a.T, d.T), rel=1e-12)
        # And the JAX kernels agree with themselves across the transpose.
        c1 = float(K.commutator(jnp.asarray(a, jnp.float32), jnp.asarray(d, jnp.float32)))
        c2 = float(K.commutator(jnp.asarray(a.T, jnp.float32), jnp.asarray(d.T, jnp.float32)))
        assert c1 == pytest.approx(c2, rel=1e-4)


def test_square_commutator_hand_case():
    # Commuting pair -> 0; A = [[0,1],[0,0]], D = A^T: AD - DA = diag(1, -1), ||.|| = sqrt 2.
    a = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    assert float(K.square_commutator(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(K.square_commutator(a, a.T)) == pytest.approx(np.sqrt(2.0), rel=1e-6)


def test_zero_update_gives_zero_contrast_without_nan():
    a = _cases()["gauss_96x96"]
    d = np.zeros_like(a)
    h = float(K.randomized_entropy(jnp.asarray(d), jax.random.PRNGKey(0)))
    hg = float(K.gram_entropy(K.gram(jnp.asarray(d))))
    assert h == 0.0 and hg == 0.0
    e = K.contrast(jnp.exp(K.exact_entropy(a)), jnp.exp(h), jnp.linalg.norm(a), jnp.asarray(0.0))
    c = K.commutator(jnp.asarray(a), jnp.asarray(d))
    assert float(e) == 0.0 and float(c) == 0.0
    # Numerically zero relative to theta0 also gives 0; a real update does not.
    tiny = K.contrast(jnp.asarray(10.0), jnp.asarray(2.0), jnp.asarray(1.0), jnp.asarray(1e-9))
    real = K.contrast(jnp.asarray(10.0), jnp.asarray(2.0), jnp.asarray(1.0), jnp.asarray(1e-3))
    assert float(tiny) == 0.0 and float(real) == pytest.approx(5.0, rel=1e-6)
