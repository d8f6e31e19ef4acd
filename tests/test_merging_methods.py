"""Merge methods against plain numpy references written independently (full float64 SVDs, one
concatenated vector per task for TIES), hand-computed cases and stated properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from larv_jax import tree
from larv_jax.merging import METHODS, get_method, linalg, methods, svc, ties_cuts

W, B, MLP = 12, 2, 20
SHAPES = {
    "visual/class_embedding": (W,),
    "visual/conv1/kernel": (4, 4, 3, W),
    "visual/positional_embedding": (5, W),
    "visual/ln_pre/scale": (W,),
    "visual/transformer/resblocks/attn/query/kernel": (B, W, W),
    "visual/transformer/resblocks/attn/query/bias": (B, W),
    "visual/transformer/resblocks/mlp/c_fc/kernel": (B, W, MLP),
    "visual/transformer/resblocks/mlp/c_proj/kernel": (B, MLP, W),
    "visual/proj/kernel": (W, 8),
}


def make_tv(k: int, seed: int = 0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: (0.01 * rng.standard_normal((k, *s))).astype(np.float32) for p, s in shapes.items()}


def matrices(path, leaf):
    """Leaf (no K axis) -> list of torch-layout matrices, written without larv_jax.tree."""
    if path.endswith("conv1/kernel"):
        return [leaf.transpose(3, 2, 0, 1).reshape(leaf.shape[3], -1)]
    stacked = "/resblocks/" in path
    mats = list(leaf) if stacked else [leaf]
    if path.endswith("/kernel"):
        mats = [m.T for m in mats]
    return mats


def is_2d(path, shape):
    nd = len(shape) - (1 if "/resblocks/" in path else 0)
    return nd == 2


def ref_spectral(tv, fn, scale):
    out = {}
    for p, t in tv.items():
        if not is_2d(p, t.shape[1:]):
            out[p] = scale * t.astype(np.float64).mean(0)
            continue
        per_task = [matrices(p, t[k].astype(np.float64)) for k in range(t.shape[0])]
        merged = [fn(np.stack([pt[b] for pt in per_task])) for b in range(len(per_task[0]))]
        if p.endswith("/kernel"):
            merged = [m.T for m in merged]
        out[p] = scale * (np.stack(merged) if "/resblocks/" in p else merged[0])
    return out


def ref_iso_c(taus):
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    return s.mean() * u @ vt


def ref_polar(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def ref_tsv(taus):
    k_t, m, n = taus.shape
    r = min(m, n)
    k = r // k_t
    ub, sb, vb = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, t in enumerate(taus):
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        ub[:, i * k:(i + 1) * k], sb[i * k:(i + 1) * k], vb[i * k:(i + 1) * k] = u[:, :k], s[:k], vt[:k]
    return ref_polar(ub) @ np.diag(sb) @ ref_polar(vb.T).T


def ref_iso_cts(taus, f=0.8):
    k_t, m, n = taus.shape
    r = min(m, n)
    c = r - round((r - math.floor(r * f)) / k_t) * k_t
    d = (r - c) // k_t
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vt[:c].T
    us, ss, vs = [], [], []
    for t in taus:
        resid = t - uc @ uc.T @ t
        u2, s2, vt2 = np.linalg.svd(resid, full_matrices=False)
        us.append(u2[:, :d]), ss.append(s2[:d]), vs.append(vt2[:d].T)
    uu = ref_polar(np.hstack(us + [uc]))
    vv = ref_polar(np.hstack(vs + [vc]))
    return np.concatenate(ss + [sc]).mean() * uu @ vv.T


def ref_ties(tv, lam, keep, agg):
    """FusionBench / TIES reference: one flat vector per task over the whole model."""
    paths = list(tv)
    flat = np.concatenate([tv[p].reshape(tv[p].shape[0], -1) for p in paths], axis=1)
    d = flat.shape[1]
    kth = np.sort(np.abs(flat), axis=1)[:, d - int(d * keep) - 1][:, None]
    trimmed = flat * (np.abs(flat) >= kth)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep_mask = np.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep_mask
    merged = sel.sum(0)
    if agg == "mean":
        merged = merged / np.maximum(1, (sel != 0).sum(0))
    merged = lam * merged
    out, i = {}, 0
    for p in paths:
        n = int(np.prod(tv[p].shape[1:]))
        out[p] = merged[i:i + n].reshape(tv[p].shape[1:])
        i += n
    return out


def assert_close(a, b, rtol=2e-4, atol=2e-6):
    assert set(a) == set(b)
    for p in a:
        np.testing.assert_allclose(a[p], b[p], rtol=rtol, atol=atol, err_msg=p)


# -- conformance over the whole registry -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_conformance(name):
    fn = METHODS[name]
    tv = make_tv(3)
    nested = tree.unflatten(tv)
    out = fn(nested)
    flat = tree.flatten(out)
    assert list(tree.flatten(nested)) == list(flat)  # same structure and order
    for p, d in flat.items():
        assert d.shape == tv[p].shape[1:] and d.dtype == np.float32, p
        assert np.isfinite(d).all(), p
    zeros = {p: np.zeros_like(t) for p, t in tv.items()}
    for p, d in fn(zeros).items():
        np.testing.assert_array_equal(d, 0, err_msg=p)


CLOSED_K1 = {  # delta for a single task vector tau (K = 1)
    "simple_average": lambda t: t,
    "task_arithmetic": lambda t: 0.3 * t,
    "tsv_m": lambda t: t,   # all r triplets of tau, polar of orthonormal bases = themselves
}


@pytest.mark.parametrize("name", sorted(CLOSED_K1))
def test_single_task_closed_form(name):
    tv = make_tv(1, seed=1)
    out = METHODS[name](tv)
    assert_close(out, {p: CLOSED_K1[name](t[0]) for p, t in tv.items()}, rtol=1e-4, atol=1e-6)


def test_single_task_iso_cts_equals_iso_c():
    # K = 1: common (top c) + residual (top r - c) is the full SVD of tau, so Iso-CTS is Iso-C.
    tv = make_tv(1, seed=2)
    a = METHODS["iso_cts"](tv, scale=1.0)
    b = METHODS["iso_c"](tv, scale=1.0)
    assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["simple_average", "task_arithmetic", "ties", "ties_paper",
                                  "iso_c"])
def test_identical_tasks(name):
    one = make_tv(1, seed=3)
    tv = {p: np.repeat(t, 4, axis=0) for p, t in one.items()}
    out = METHODS[name](tv)
    if name in ("ties", "ties_paper"):
        trim = ref_ties(one, 1.0, 0.2, "sum")
        want = {p: (0.3 * 4 if name == "ties" else 1.0) * trim[p] for p in trim}
    elif name == "iso_c":
        # matrices: sum = 4 tau -> 4x the spectrum; fallback leaves: the mean, unchanged
        want = {p: (4 if is_2d(p, one[p].shape[1:]) else 1) * d
                for p, d in METHODS["iso_c"](one).items()}
    else:
        want = {p: (0.3 * 4 if name == "task_arithmetic" else 1.0) * t[0] for p, t in one.items()}
    assert_close(out, want, rtol=1e-4, atol=1e-6)


# -- per-method references -------------------------------------------------------------------
def test_iso_c_matches_numpy_and_is_flat():
    tv = make_tv(4, seed=4)
    out = METHODS["iso_c"](tv, model="ViT-B-16")   # scale None -> 1.40 for ViT-B-16
    assert_close(out, ref_spectral(tv, ref_iso_c, 1.40))
    q = out["visual/transformer/resblocks/mlp/c_fc/kernel"][1]
    s = np.linalg.svd(q.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s.mean(), rtol=1e-5)
    other = METHODS["iso_c"](tv)  # unknown model -> 1.0
    np.testing.assert_allclose(1.40 * other["visual/proj/kernel"], out["visual/proj/kernel"],
                               rtol=1e-5)


def test_tsv_m_matches_numpy_and_rank_per_task():
    tv = make_tv(5, seed=5)
    out = METHODS["tsv_m"](tv, scale=0.7)
    assert_close(out, ref_spectral(tv, ref_tsv, 0.7))
    # r = 12, K = 5: floor(12/5) = 2 triplets per task -> rank 10 of 12.
    s = np.linalg.svd(out["visual/transformer/resblocks/attn/query/kernel"][0].astype(np.float64),
                      compute_uv=False)
    assert np.sum(s > 1e-6 * s[0]) == 5 * 2
    # and one task at a time: its floor(r/K) triplets are exactly its top ones
    u, sv, vt = linalg.svd(np.arange(30.0).reshape(6, 5) ** 1.5, 2)
    uu, ss, vv = np.linalg.svd(np.arange(30.0).reshape(6, 5) ** 1.5)
    np.testing.assert_allclose(sv, ss[:2], rtol=1e-10)
    np.testing.assert_allclose(np.abs(u.T @ uu[:, :2]), np.eye(2), atol=1e-8)


def test_iso_cts_matches_numpy_and_is_flat():
    tv = make_tv(3, seed=6)
    out = METHODS["iso_cts"](tv)
    assert_close(out, ref_spectral(tv, ref_iso_cts, 1.5))
    s = np.linalg.svd(out["visual/positional_embedding"].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s[0], rtol=1e-5)


@pytest.mark.parametrize("r,k,c,d", [
    # c0 = floor(0.8 r); s = round((r - c0)/K) K; c = r - s; d = s / K
    (768, 8, 616, 19), (768, 14, 614, 11), (768, 20, 608, 8),
    (1024, 8, 816, 26), (1024, 14, 814, 15), (1024, 20, 824, 10),
])
def test_iso_cts_subspace_sizes(r, k, c, d):
    assert linalg.iso_cts_sizes(r, k, 0.8) == (c, d)
    assert c + k * d == r


def test_iso_cts_round_is_python_round():
    # r = 10, f = 0.75: c0 = 7, (10 - 7)/2 = 1.5 -> round = 2 (banker's) -> s = 4, c = 6, d = 2;
    # r = 14, f = 0.5, K = 4: (14 - 7)/4 = 1.75 -> 2; r = 10, f = 0.5, K = 4: 5/4 -> 1.
    assert linalg.iso_cts_sizes(10, 2, 0.75) == (6, 2)
    assert linalg.iso_cts_sizes(14, 4, 0.5) == (6, 2)
    assert linalg.iso_cts_sizes(10, 4, 0.5) == (6, 1)
    assert linalg.iso_cts_sizes(9, 2, 0.5) == (5, 2)   # (9 - 4)/2 = 2.5 -> round half even = 2


@pytest.mark.parametrize("agg,lam,name", [("sum", 0.3, "ties"), ("mean", 1.0, "ties_paper")])
def test_ties_matches_reference(agg, lam, name):
    tv = make_tv(4, seed=7)
    # exact cancellations: entries where two tasks cancel and the others are tiny (trimmed)
    q = tv["visual/ln_pre/scale"]
    q[:, :3] = 0
    q[0, :3], q[1, :3] = 0.5, -0.5
    assert_close(METHODS[name](tv), ref_ties(tv, lam, 0.2, agg), rtol=1e-5, atol=1e-7)


def test_ties_keeps_floor_plus_one_and_ties():
    rng = np.random.default_rng(8)
    tv = {"a": rng.standard_normal((2, 1000)).astype(np.float32),
          "b": rng.standard_normal((2, 37, 3)).astype(np.float32)}
    d = 1000 + 111
    cuts = ties_cuts(tv, keep=0.2)
    for k in range(2):
        kept = sum(int((np.abs(t[k]) >= cuts[k]).sum()) for t in tv.values())
        assert kept == d // 5 + 1
    # ties at the cut: duplicate the cut value 5 more times in task 0 -> 5 more kept
    allv = np.sort(np.abs(np.concatenate([t[0].ravel() for t in tv.values()])))
    cut0 = allv[d - d // 5 - 1]
    a = tv["a"].copy()
    small = np.argsort(np.abs(a[0]))[:5]
    a[0, small] = cut0
    tv2 = {"a": a, "b": tv["b"]}
    c2 = ties_cuts(tv2, keep=0.2)
    kept = sum(int((np.abs(t[0]) >= c2[0]).sum()) for t in tv2.values())
    assert kept == d // 5 + 1 + 5
    # many values in one histogram bucket (same top 16 bits): selection inside it is exact
    same = (1.0 + np.arange(4000, dtype=np.float32) * 2 ** -22).astype(np.float32)
    tv3 = {"x": np.stack([same, same[::-1]])}
    np.testing.assert_array_equal(ties_cuts(tv3, keep=0.2), np.sort(same)[4000 - 800 - 1])
    assert ties_cuts(tv3, keep=1.0).tolist() == [0.0, 0.0]


def test_dare_masks_exact_and_keep_rate():
    tv = make_tv(3, seed=9)
    rng = np.random.default_rng(10)
    masks = {p: rng.random(t.shape) < 0.6 for p, t in tv.items()}
    out = METHODS["dare_task_arithmetic"](tv, p=0.4, masks=masks)
    want = {p: 0.3 * np.sum(np.where(masks[p], t / np.float32(0.6), 0), axis=0)
            for p, t in tv.items()}
    assert_close(out, want, rtol=1e-5, atol=1e-7)
    out_avg = METHODS["dare_average"](tv, p=0.4, masks=masks)
    assert_close(out_avg, {p: w / 0.9 for p, w in want.items()}, rtol=1e-5, atol=1e-7)
    dropped = {p: np.where(masks[p], t / np.float32(0.6), 0).astype(np.float32) for p, t in tv.items()}
    assert_close(METHODS["dare_ties"](tv, p=0.4, masks=masks), ref_ties(dropped, 0.5, 0.2, "sum"),
                 rtol=1e-5, atol=1e-7)
    # random masks: keep rate 1 - p, kept entries rescaled by 1/(1 - p), reproducible by key
    big = {"visual/ln_pre/scale": np.ones((2, 200_000), np.float32)}
    a = METHODS["dare_average"](big, p=0.3, key=5)["visual/ln_pre/scale"]
    vals = np.unique(a)
    np.testing.assert_allclose(vals, np.array([0, 0.5, 1.0]) / 0.7, rtol=1e-6)
    keep_rate = (a * 0.7 * 2).mean() / 2
    assert abs(keep_rate - 0.7) < 0.005
    b = METHODS["dare_average"](big, p=0.3, key=5)["visual/ln_pre/scale"]
    c = METHODS["dare_average"](big, p=0.3, key=6)["visual/ln_pre/scale"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_svc_hand_example_and_untouched_vectors():
    # D_m = diag(3, 1) (a Dense kernel: symmetric, so layout does not matter here), K = 2,
    # tau_1 = diag(2, 0), tau_2 = diag(0, 2), alpha = 0.1:
    # direction 1: s^1 = 3*2/4 = 1.5, s^2 = 0 -> 0.1; gamma = 2/1.6 = 1.25 -> 3.75
    # direction 2: s^1 = 0 -> 0.1, s^2 = 1*2/4 = 0.5; gamma = 2/0.6 -> 10/3
    p = "visual/proj/kernel"
    delta = {p: np.diag([3.0, 1.0]).astype(np.float32), "visual/ln_pre/scale": np.ones(2, np.float32)}
    tv = {p: np.stack([np.diag([2.0, 0.0]), np.diag([0.0, 2.0])]).astype(np.float32),
          "visual/ln_pre/scale": np.zeros((2, 2), np.float32)}
    out = svc(delta, tv, alpha=0.1)
    np.testing.assert_allclose(out[p], np.diag([3.75, 10 / 3]), rtol=1e-6, atol=1e-7)
    assert out["visual/ln_pre/scale"] is delta["visual/ln_pre/scale"]


def test_svc_matches_numpy_in_torch_layout():
    tv = make_tv(3, seed=11)
    delta = METHODS["task_arithmetic"](tv)

    def ref(m_and_taus, alpha=0.1):
        dm, taus = m_and_taus[0], m_and_taus[1:]
        u, s, vt = np.linalg.svd(dm, full_matrices=False)
        gam = []
        for r in range(len(s)):
            ratios = []
            for t in taus:
                ai, am = u[:, r] @ t, s[r] * vt[r]
                ratios.append(max(am @ ai / max(ai @ ai, 1e-12), alpha))
            gam.append(len(taus) / sum(ratios))
        return u @ np.diag(np.array(gam) * s) @ vt

    both = {p: np.concatenate([delta[p][None], t]) for p, t in tv.items()}
    want = ref_spectral(both, ref, 1.0)
    out = svc(delta, tv)
    for p in tv:
        if is_2d(p, tv[p].shape[1:]):
            np.testing.assert_allclose(out[p], want[p], rtol=2e-4, atol=2e-6, err_msg=p)
        else:
            assert out[p] is delta[p]
    # the calibration is not transpose-symmetric: applying it to [in, out] would differ
    k = "visual/proj/kernel"
    wrong = linalg.svc_matrix(delta[k], tv[k], 0.1)
    assert not np.allclose(wrong, out[k], rtol=1e-3)


def test_exclude_takes_fallback():
    tv = make_tv(3, seed=12)
    out = METHODS["iso_c"](tv, exclude=[r"c_fc"])
    # references in float64: Iso-C sums the task vectors in float64 (float32 means of
    # cancelling entries are off by ~1e-6 relative themselves)
    np.testing.assert_allclose(
        out["visual/transformer/resblocks/mlp/c_fc/kernel"],
        tv["visual/transformer/resblocks/mlp/c_fc/kernel"].astype(np.float64).mean(0), rtol=1e-6)
    # the conv takes the fallback under the 2-D rule
    np.testing.assert_allclose(out["visual/conv1/kernel"],
                               tv["visual/conv1/kernel"].astype(np.float64).mean(0), rtol=1e-6)


# -- bad inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,word", [
    ("dare_task_arithmetic", dict(p=1.0), "p "), ("dare_ties", dict(p=-0.1), "p "),
    ("task_arithmetic", dict(scale=-1.0), "scale"), ("ties", dict(keep=0.0), "keep"),
    ("ties", dict(keep=1.5), "keep"), ("ties", dict(aggregate="max"), "aggregate"),
    ("iso_c", dict(scale=float("nan")), "scale"), ("tsv_m", dict(scale=-0.5), "scale"),
    ("iso_cts", dict(common_fraction=1.2), "common_fraction"),
])
def test_bad_hyperparameters_raise(name, kw, word):
    with pytest.raises(ValueError, match=word):
        METHODS[name](make_tv(2), **kw)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="valid"):
        get_method("fisher")
    with pytest.raises(ValueError, match="alpha"):
        svc(make_tv(1), make_tv(2), alpha=0.0)
    with pytest.raises(ValueError, match="then"):
        methods.dare(make_tv(2), then="iso_c")
