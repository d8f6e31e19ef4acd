"""SVC on spectra with clusters of (near-)equal singular values (issue 16, item 2; docs/SPEC.md §5).

Iso-C's and Iso-CTS's merged spectra are flat by construction, so the SVD's basis inside the
cluster is arbitrary and a plain SVC is defined by rounding (measured below: a 1e-7 relative
perturbation of the delta moves it by 5-13 % of its largest entry). Inside a cluster larv_jax takes
the tasks' energy eigenbasis; these tests hold it to <= 1e-6 (relative to the output's largest
entry) under a random rotation of the SVD's basis inside the cluster and under 1e-7 perturbations
of the delta, and hold non-degenerate spectra to the plain formula bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from larv_jax.arrays import contiguous
from larv_jax.merging import linalg
from larv_jax.merging.svc import svc

TOL = 1e-6


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def plain_svc(dm, taus, alpha):
    """The SVC formula with the SVD's own basis, written as before the cluster rule (the same
    float32 projections), so 'non-degenerate spectra give exactly what they gave' is testable."""
    u, s, vt = linalg.svd(np.asarray(dm, np.float64))
    a_m = s[:, None] * vt
    u32t = np.ascontiguousarray(u.T, dtype=np.float32)
    ratios = []
    for t in taus:
        a_i = (u32t @ contiguous(t, np.float32)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append(np.einsum("rn,rn->r", a_m, a_i)
                          / np.maximum(np.einsum("rn,rn->r", a_i, a_i), 1e-12))
    ratio = np.stack(ratios)
    ratio = np.where(np.isnan(ratio) | np.isneginf(ratio), alpha, ratio)
    return (u * (taus.shape[0] / np.maximum(ratio, alpha).sum(0) * s)) @ vt


def gaussian_tasks(k, m, n, seed):
    return 1e-3 * np.random.default_rng(seed).standard_normal((k, m, n)).astype(np.float32)


def lora_tasks(k, m, n, seed, rank=8):
    rng = np.random.default_rng(seed)
    return np.stack([1e-3 * (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
                             + 1e-3 * rng.standard_normal((m, n))) for _ in range(k)]
                    ).astype(np.float32)


def perturbed(d, seed, rel=1e-7):
    rng = np.random.default_rng(seed)
    return (d.astype(np.float64) * (1 + rel * rng.standard_normal(d.shape))).astype(np.float32)


def rotated_basis(d, j, k, seed):
    """The SVD of ``d`` with its basis rotated by a random orthogonal Q inside ``[j, k)`` (U and V
    alike, so U S V^T is unchanged where S is constant)."""
    u, s, vt = linalg.svd(np.asarray(d, np.float64))
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k - j, k - j)))
    u, vt = u.copy(), vt.copy()
    u[:, j:k] = u[:, j:k] @ q
    vt[j:k] = q.T @ vt[j:k]
    return u, s, vt


def test_singular_clusters_by_hand():
    sc = linalg.singular_clusters
    assert sc(np.array([3.0, 2.0, 1.0])) == []
    assert sc(np.array([3.0, 2.0, 2.0, 2.0, 1.0])) == [(1, 4)]
    assert sc(np.array([1.0, 1.0, 0.5, 0.5])) == [(0, 2), (2, 4)]
    assert sc(np.full(5, 2.0)) == [(0, 5)]
    # chained: neighbours equal to a relative 1e-5, the run spans 2.7e-5
    assert sc(np.array([1.0, 1 - 0.9e-5, 1 - 1.8e-5, 1 - 2.7e-5, 0.5])) == [(0, 4)]
    assert sc(np.array([1.0, 1 - 2e-5, 0.5])) == []
    # relative to the values, not to sigma_1: a tail of small distinct values is no cluster,
    # equal small ones are
    assert sc(np.array([1.0, 1e-3, 0.99e-3, 0.98e-3])) == []
    assert sc(np.array([1.0, 1e-3, 1e-3 * (1 - 1e-6)])) == [(1, 3)]
    # null directions (zero singular values) are in no cluster
    assert sc(np.array([1.0, 0.5, 0.0, 0.0])) == [] and sc(np.zeros(4)) == []
    assert sc(np.array([1.0, 1.0, 0.0, 0.0])) == [(0, 2)]
    assert sc(np.array([1.0, 1 - 1e-3]), rtol=1e-2) == [(0, 2)]


@pytest.mark.parametrize("kind,k,m,n", [("gauss", 4, 192, 160), ("gauss", 4, 160, 192),
                                        ("gauss", 4, 128, 128), ("lora", 4, 192, 160),
                                        ("lora", 6, 96, 256)])
@pytest.mark.parametrize("merger", ["iso_c", "iso_cts"])
def test_flat_spectra_do_not_depend_on_rounding(kind, k, m, n, merger):
    taus = (gaussian_tasks if kind == "gauss" else lora_tasks)(k, m, n, seed=m + n + k)
    d64 = (linalg.iso_c_matrix(taus) if merger == "iso_c"
           else linalg.iso_cts_matrix(taus, 0.8))
    d = (1.5 * d64).astype(np.float32)
    s = linalg.svd(d.astype(np.float64))[1]
    assert linalg.singular_clusters(s) == [(0, min(m, n))]   # flat: one cluster
    got, n_in = linalg._svc_matrix(d, taus, 0.1, linalg.SVC_CLUSTER_RTOL)
    assert n_in == min(m, n)
    assert rel_err(linalg.svc_matrix(perturbed(d, 1), taus, 0.1), got) <= TOL
    got_rot, _ = linalg._svc_matrix(d, taus, 0.1, linalg.SVC_CLUSTER_RTOL,
                                    basis=rotated_basis(d, 0, min(m, n), seed=2))
    assert rel_err(got_rot, got) <= TOL
    # ... where the plain formula is rounding: the same perturbation moves it by percents
    assert rel_err(plain_svc(perturbed(d, 1), taus, 0.1), plain_svc(d, taus, 0.1)) > 1e-2


def test_a_cluster_inside_a_spread_spectrum():
    """Only the cluster's directions are re-chosen: outside it the plain formula's gamma_r S_r
    holds, and the output does not depend on the basis chosen inside the cluster."""
    rng = np.random.default_rng(5)
    m, n, k = 120, 80, 3
    q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.concatenate([np.linspace(2.0, 1.2, 20), np.full(30, 1.0), np.linspace(0.8, 0.1, 30)])
    d = (q1 * s) @ q2.T
    taus = (d[None] / k + 0.05 * rng.standard_normal((k, m, n))).astype(np.float32)
    assert linalg.singular_clusters(linalg.svd(d)[1]) == [(20, 50)]
    got, n_in = linalg._svc_matrix(d, taus, 0.1, linalg.SVC_CLUSTER_RTOL)
    assert n_in == 30
    rot, _ = linalg._svc_matrix(d, taus, 0.1, linalg.SVC_CLUSTER_RTOL,
                                basis=rotated_basis(d, 20, 50, seed=6))
    assert rel_err(rot, got) <= TOL
    # outside the cluster: u_r^T D' = gamma_r S_r v_r^T with the plain formula's gamma_r, to the
    # float32 projections' precision (the rows outside clusters are one float32 product apart
    # from the plain formula's, whose BLAS blocking rounds differently: 4e-8 measured)
    u, sv, vt = linalg.svd(d)
    plain = plain_svc(d, taus, 0.1)
    outside = np.r_[0:20, 50:80]
    np.testing.assert_allclose(u[:, outside].T @ got, u[:, outside].T @ plain, rtol=0,
                               atol=TOL * np.abs(plain).max())
    # inside: the output maps into the cluster's left space only
    inside = u[:, 20:50] @ (u[:, 20:50].T @ got)
    np.testing.assert_allclose(u[:, 20:50].T @ (got - inside), 0, atol=1e-12)


def test_one_task_equal_to_the_delta_is_left_as_it_is():
    """K = 1 and tau = D: every ratio is 1, so gamma = 1 and D' = D, flat spectrum or not."""
    rng = np.random.default_rng(9)
    q1, _ = np.linalg.qr(rng.standard_normal((64, 48)))
    q2, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    for s in (np.full(48, 0.7), np.geomspace(1.0, 0.01, 48)):
        d = ((q1 * s) @ q2.T).astype(np.float32)
        out = linalg.svc_matrix(d, d[None], 0.1)
        np.testing.assert_allclose(out, d, rtol=0, atol=1e-6 * np.abs(d).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_degenerate_spectra_are_bit_identical_to_the_plain_formula(seed):
    taus = gaussian_tasks(4, 96, 72, seed)
    for dm in (0.3 * taus.astype(np.float64).sum(0), linalg.tsv_m_matrix(taus)):
        assert linalg.singular_clusters(linalg.svd(dm)[1]) == []
        np.testing.assert_array_equal(linalg.svc_matrix(dm, taus, 0.1), plain_svc(dm, taus, 0.1))


def test_svc_warns_once_per_call_when_a_cluster_is_met():
    taus = gaussian_tasks(3, 48, 40, 0)
    flat = {"a/kernel": 1.5 * linalg.iso_c_matrix(taus).T.astype(np.float32),
            "b/kernel": 1.5 * linalg.iso_c_matrix(taus[::-1]).T.astype(np.float32)}
    tv = {"a/kernel": taus.swapaxes(1, 2), "b/kernel": taus[::-1].swapaxes(1, 2)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        svc(flat, tv, alpha=0.1)
    assert len(w) == 1 and "2 matrices" in str(w[0].message) and "a/kernel" in str(w[0].message)
    ta = {"a/kernel": 0.3 * taus.sum(0).T}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        svc(ta, {"a/kernel": taus.swapaxes(1, 2)}, alpha=0.1)
    assert w == []
    with pytest.raises(ValueError, match="cluster_rtol"):
        svc(ta, {"a/kernel": taus.swapaxes(1, 2)}, alpha=0.1, cluster_rtol=-1.0)
