"""The LARV veneer (SPEC §3): post/pre composition, SVC order, identities, per-unit placement."""

import jax
import numpy as np
import pytest

from larv_jax import diagnostics as dg
from larv_jax import tree as ltree
from larv_jax.larv import veneer as V
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, VisionConfig

TINY = CLIPConfig(vision=VisionConfig(width=16, layers=2, heads=2, mlp_dim=32, image_size=16,
                                      patch_size=8), name="tiny")
LAM = 0.3


def ta(tau):
    """Task Arithmetic written here as the reference merger: 0.3 * sum_k tau_k."""
    return {p: np.float32(LAM) * t.sum(axis=0) for p, t in tau.items()}


@pytest.fixture(scope="module")
def zoo():
    rng = np.random.default_rng(1)
    base = {p: rng.normal(0, 0.1, s.shape).astype(np.float32)
            for p, s in ltree.flatten(abstract_params(TINY)).items()}
    models = []
    for k in range(3):
        m = {}
        for p, v in base.items():
            # low-rank-ish update plus noise so the diagnostics have structure
            noise = rng.normal(0, 0.02, v.shape).astype(np.float32)
            m[p] = v + noise * np.float32(k + 1)
        # the attention biases of every task are left untouched (zero update)
        for p in m:
            if p.endswith("attn/query/bias"):
                m[p] = base[p].copy()
        models.append(m)
    return base, models


def test_units_of_tiny_model(zoo):
    base, _ = zoo
    us = dg.units({p: v.shape for p, v in base.items()})
    assert [u.name for u in us] == ["patch", "attn_0", "mlp_in_0", "mlp_out_0", "attn_1",
                                    "mlp_in_1", "mlp_out_1"]


@pytest.mark.parametrize("gate", ["none", "uniform(1)", "tiered(tiers=(1, 1, 1))"])
def test_all_ones_reproduces_plain_merge_bit_for_bit(zoo, gate):
    base, models = zoo
    params, res = V.larv_merge(base, models, method=ta, gate=gate)
    tau = V.task_vectors(base, models)
    plain = {p: base[p] + ta(tau)[p] for p in base}
    assert list(params) == list(base)
    for p in base:
        assert params[p].dtype == np.float32
        np.testing.assert_array_equal(params[p], plain[p], err_msg=p)
    np.testing.assert_array_equal(res.s, np.ones(7))


def test_post_scales_each_unit_member(zoo):
    base, models = zoo
    params, res = V.larv_merge(base, models, method=ta, gate="linear")
    tau = V.task_vectors(base, models)
    delta = ta(tau)
    s = np.linspace(0.5, 1.5, 7)
    np.testing.assert_allclose(res.s, s)
    # Module granularity by hand: patch = unit 0, block b: attn 1 + 3b, mlp_in 2 + 3b, mlp_out 3 + 3b;
    # ln_post attaches to the last unit.
    expect = {"visual/conv1/kernel": s[0], "visual/positional_embedding": s[0],
              "visual/ln_pre/scale": s[0], "visual/ln_post/bias": s[6]}
    for p, sv in expect.items():
        np.testing.assert_allclose(params[p] - base[p], np.float32(sv) * delta[p], atol=1e-6)
    for b in range(2):
        for leaf, off in (("attn/key/kernel", 1), ("ln_1/scale", 1), ("mlp/c_fc/bias", 2),
                          ("ln_2/bias", 2), ("mlp/c_proj/kernel", 3)):
            p = f"visual/transformer/resblocks/{leaf}"
            np.testing.assert_allclose(params[p][b] - base[p][b],
                                       np.float32(s[off + 3 * b]) * delta[p][b], atol=1e-6)


def test_zero_update_stays_at_base(zoo):
    base, models = zoo
    params, res = V.larv_merge(base, models, method=ta, gate="uniform(1.5)")
    p = "visual/transformer/resblocks/attn/query/bias"
    np.testing.assert_array_equal(params[p], base[p])
    # a whole unit with zero update: diagnostics give e = 0 and the unit stays at base
    zero_unit = [dict(m) for m in models]
    for m in zero_unit:
        for leaf in ("mlp/c_proj/kernel", "mlp/c_proj/bias"):
            q = f"visual/transformer/resblocks/{leaf}"
            m[q] = base[q].copy()
    params, res = V.larv_merge(base, zero_unit, method=ta, gate="tiered")
    for leaf in ("mlp/c_proj/kernel", "mlp/c_proj/bias"):
        q = f"visual/transformer/resblocks/{leaf}"
        np.testing.assert_array_equal(params[q], base[q])
    rows = {r.name: r for r in res.report}
    assert rows["mlp_out_0"].e == 0.0 and rows["mlp_out_1"].e == 0.0
    assert rows["mlp_out_0"].s == 0.5


def test_pre_equals_post_for_task_arithmetic(zoo):
    base, models = zoo
    post, rp = V.larv_merge(base, models, method=ta, gate="tiered")
    pre, rq = V.larv_merge(base, models, method=ta, gate="tiered", apply="pre")
    np.testing.assert_array_equal(rp.s, rq.s)
    assert len(set(rp.s.tolist())) == 3  # the gate really scales
    for p in base:
        np.testing.assert_allclose(pre[p], post[p], rtol=1e-6, atol=1e-7, err_msg=p)


def test_pre_differs_for_nonlinear_merger(zoo):
    base, models = zoo

    def signmax(tau):  # nonlinear and not homogeneous in tau: sign(sum) * 0.01
        return {p: np.float32(0.01) * np.sign(t.sum(axis=0)) for p, t in tau.items()}

    post, _ = V.larv_merge(base, models, method=signmax, gate="tier3")
    pre, _ = V.larv_merge(base, models, method=signmax, gate="tier3", apply="pre")
    p = "visual/conv1/kernel"  # scale 0.5 unit: pre gives sign(0.5 sum) = sign(sum), post halves it
    np.testing.assert_allclose(post[p] - base[p], 0.5 * (pre[p] - base[p]), rtol=1e-5)


def test_report_fields(zoo):
    base, models = zoo
    _, res = V.larv_merge(base, models, method=ta, gate="continuous")
    assert [r.depth for r in res.report] == list(range(1, 8))
    d = res.diagnostics
    np.testing.assert_array_equal([r.e for r in res.report], d.e)
    np.testing.assert_array_equal([r.c for r in res.report], d.c)
    z = (d.c - d.c.mean()) / d.c.std()
    np.testing.assert_allclose([r.z for r in res.report], z, rtol=1e-12)
    w = d.e * np.sqrt(np.arange(1, 8) / 7) / (np.log1p(np.exp(z)) + 1)
    np.testing.assert_allclose([r.w for r in res.report], w, rtol=1e-12)
    np.testing.assert_allclose(res.s, 1 + 0.5 * np.tanh(3 * (w - 1)), rtol=1e-12)
    # depth-only schedule: no diagnostics unless asked
    _, res = V.larv_merge(base, models, method=ta, gate="tier2")
    assert res.diagnostics is None and res.report[0].e is None


def test_svc_order(zoo):
    base, models = zoo
    calls = []

    def svc(delta, tau):  # homogeneous linear stand-in: the diagnostics are scale invariant
        calls.append(1)
        return {p: np.float32(2.0) * v for p, v in delta.items()}

    a, ra = V.larv_merge(base, models, method=ta, gate="tiered", svc=svc)
    b, rb = V.larv_merge(base, models, method=ta, gate="tiered", svc=svc, svc_order="larv_first")
    np.testing.assert_array_equal(ra.s, rb.s)
    for p in base:
        np.testing.assert_allclose(a[p], b[p], rtol=1e-6, atol=1e-7)
    plain, _ = V.larv_merge(base, models, method=ta, gate="tiered")
    p = "visual/transformer/resblocks/mlp/c_fc/kernel"
    np.testing.assert_allclose(a[p] - base[p], 2.0 * (plain[p] - base[p]), rtol=1e-4, atol=1e-7)
    assert len(calls) == 2


def test_veneer_on_given_delta_and_errors(zoo):
    base, models = zoo
    delta = ta(V.task_vectors(base, models))
    us = dg.units({p: v.shape for p, v in base.items()})
    cache = dg.base_cache(base, us)
    diag = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(0), cache=cache)
    params, res = V.veneer(base, delta, gate="tiered", diagnostics=diag)
    params2, _ = V.veneer(base, delta, gate="tiered", cache=cache)
    for p in base:
        np.testing.assert_array_equal(params[p], params2[p])
    with pytest.raises(ValueError, match="unknown apply mode"):
        V.larv_merge(base, models, method=ta, apply="middle")
    with pytest.raises(ValueError, match="unknown LARV gate"):
        V.larv_merge(base, models, method=ta, gate="tierd")
    with pytest.raises(ValueError, match="parameters the base lacks"):
        V.apply_scales(base, {**delta, "visual/extra": np.zeros(3)}, us, np.ones(7))
    with pytest.raises(ValueError, match="unknown diagnostics option"):
        V.veneer(base, delta, diag_options={"kk": 3})


def test_cli_flags_hook(zoo):
    import argparse

    from larv_jax.larv import flags

    base, models = zoo
    tau = V.task_vectors(base, models)
    delta = ta(tau)
    parser = flags.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert not flags.enabled(args)
    params, res = flags.apply(args, base=base, delta=delta)
    for p in base:
        np.testing.assert_array_equal(params[p], base[p] + delta[p])
    args = parser.parse_args(["--larv", "tiered", "--larv-set", "alpha=0.5", "--larv-k", "8"])
    assert flags.enabled(args) and flags.svc_before_larv(args)
    params, res = flags.apply(args, base=base, delta=delta)
    want, wres = V.larv_merge(base, tau, method=ta, gate="tiered", alpha=0.5,
                              diag_options={"k": 8, "p": 10, "q": 2})
    np.testing.assert_array_equal(res.s, wres.s)
    assert sorted(set(res.s.tolist())) == [0.5, 1.0, 1.5] and (res.s == 0.5).sum() == 4
    for p in base:
        np.testing.assert_array_equal(params[p], want[p])
    assert "mlp_out_1" in flags.format_report(res) and len(flags.report_rows(res)) == 7
    pre = parser.parse_args(["--larv", "tier3", "--larv-apply", "pre"])
    with pytest.raises(ValueError, match="needs the merger"):
        flags.apply(pre, base=base, delta=delta)
    params_pre, _ = flags.apply(pre, base=base, delta=delta, merge=ta, tau=tau)
    params_post, _ = flags.apply(parser.parse_args(["--larv", "tier3"]), base=base, delta=delta)
    for p in base:
        np.testing.assert_allclose(params_pre[p], params_post[p], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="unknown LARV gate"):
        flags.apply(parser.parse_args(["--larv", "bogus"]), base=base, delta=delta)


def test_every_registry_merger_under_larv(zoo):
    from larv_jax.merging import METHODS

    base, models = zoo
    tau = V.task_vectors(base, models)
    for name, fn in METHODS.items():
        plain, _ = V.larv_merge(base, tau, method=name, gate="none")
        delta = fn(tau)
        for p in base:
            np.testing.assert_array_equal(plain[p], base[p] + np.asarray(delta[p], np.float32),
                                          err_msg=f"{name} {p}")
        params, res = V.larv_merge(base, tau, method=name, gate="tiered", svc=True)
        assert all(np.isfinite(v).all() for v in params.values()), name
        assert sorted(set(res.s.tolist())) == [0.5, 1.0, 1.5], name


def test_checkpoint_inputs_stream_and_match_memory(zoo, tmp_path):
    from larv_jax.checkpoint import save_hf

    base, models = zoo
    save_hf(base, TINY, tmp_path / "base")
    paths = []
    for k, m in enumerate(models):
        save_hf(m, TINY, tmp_path / f"m{k}")
        paths.append(tmp_path / f"m{k}")
    for kw in ({"gate": "tiered"}, {"gate": "tiered", "apply": "pre"},
               {"gate": "continuous", "svc": True}):
        a, ra = V.larv_merge(tmp_path / "base", paths, method="ties", **kw)
        b, rb = V.larv_merge(base, models, method="ties", **kw)
        np.testing.assert_array_equal(ra.s, rb.s)
        for p in base:
            np.testing.assert_array_equal(a[p], b[p], err_msg=f"{kw} {p}")


@pytest.mark.parametrize("argv,svc", [
    (["--larv", "tiered"], False),
    (["--larv", "continuous", "--larv-apply", "pre"], True),
    (["--larv", "tiered", "--larv-svc-order", "larv_first"], True),
])
def test_merge_command_hook_with_engine(zoo, tmp_path, argv, svc):
    """What `larv merge` does with the hook: merge_delta -> flags.finish -> apply_delta."""
    import argparse

    from larv_jax.checkpoint import load_checkpoint, save_hf
    from larv_jax.larv import flags
    from larv_jax.merging import apply_delta, merge_delta

    base, models = zoo
    save_hf(base, TINY, tmp_path / "base")
    paths = []
    for k, m in enumerate(models):
        save_hf(m, TINY, tmp_path / f"m{k}")
        paths.append(tmp_path / f"m{k}")
    parser = flags.add_arguments(argparse.ArgumentParser())
    parser.add_argument("--svc", action="store_true")
    parser.add_argument("--svc-alpha", type=float, default=None)
    args = parser.parse_args(argv + (["--svc"] if svc else []))
    b = load_checkpoint(tmp_path / "base")
    ms = [load_checkpoint(p) for p in paths]
    delta, _ = merge_delta(b, ms, "ties", svc=args.svc and flags.svc_before_larv(args),
                           hash_inputs=False)
    delta, scales, report = flags.finish(args, b, delta, models=ms, method="ties", hparams={})
    params = apply_delta(b, delta, scales=scales)
    want, res = V.larv_merge(base, models, method="ties", gate=args.larv, apply=args.larv_apply,
                             svc=svc, svc_order=args.larv_svc_order)
    np.testing.assert_array_equal([u["s"] for u in report["units"]], res.s)
    for p in base:
        np.testing.assert_allclose(params[p], want[p], rtol=1e-6, atol=1e-7, err_msg=p)
