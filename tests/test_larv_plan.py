"""The LARV plan and apply (SPEC §3): post/pre composition, SVC order, identities, per-unit
placement, the CLI's flags."""

import contextlib

import jax
import numpy as np
import pytest
from helpers import larv_reference

from larv_jax import diagnostics as dg
from larv_jax import tree as ltree
from larv_jax.larv import plan as L
from larv_jax.merging import registry, task_vectors
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




def larv(base, models, *, method, gate="tiered", svc=None, **kw):
    """merge -> plan -> apply on in-memory models (or task vectors); ``method`` a callable or a
    registry name (``svc=True``: the registry's SVC of that method)."""
    tau = models if isinstance(models, dict) else task_vectors(base, models)
    merge = registry.bind(method) if isinstance(method, str) else method
    if svc is True:
        svc = registry.bind_svc(method)
    return larv_reference(base, tau, merge, gate=gate, svc=svc, **kw)


def test_units_of_tiny_model(zoo):
    base, _ = zoo
    us = dg.units({p: v.shape for p, v in base.items()})
    assert [u.name for u in us] == ["patch", "attn_0", "mlp_in_0", "mlp_out_0", "attn_1",
                                    "mlp_in_1", "mlp_out_1"]


@pytest.mark.parametrize("gate", ["none", "uniform(1)", "tiered(tiers=(1, 1, 1))"])
def test_all_ones_reproduces_plain_merge_bit_for_bit(zoo, gate):
    base, models = zoo
    params, res = larv(base, models, method=ta, gate=gate)
    tau = task_vectors(base, models)
    plain = {p: base[p] + ta(tau)[p] for p in base}
    assert list(params) == list(base)
    for p in base:
        assert params[p].dtype == np.float32
        np.testing.assert_array_equal(params[p], plain[p], err_msg=p)
    np.testing.assert_array_equal(res.s, np.ones(7))


def test_post_scales_each_unit_member(zoo):
    base, models = zoo
    params, res = larv(base, models, method=ta, gate="linear")
    tau = task_vectors(base, models)
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
    params, res = larv(base, models, method=ta, gate="uniform(1.5)")
    p = "visual/transformer/resblocks/attn/query/bias"
    np.testing.assert_array_equal(params[p], base[p])
    # a whole unit with zero update: diagnostics give e = 0 and the unit stays at base
    zero_unit = [dict(m) for m in models]
    for m in zero_unit:
        for leaf in ("mlp/c_proj/kernel", "mlp/c_proj/bias"):
            q = f"visual/transformer/resblocks/{leaf}"
            m[q] = base[q].copy()
    params, res = larv(base, zero_unit, method=ta, gate="tiered")
    for leaf in ("mlp/c_proj/kernel", "mlp/c_proj/bias"):
        q = f"visual/transformer/resblocks/{leaf}"
        np.testing.assert_array_equal(params[q], base[q])
    rows = {r.name: r for r in res.report()}
    assert rows["mlp_out_0"].e == 0.0 and rows["mlp_out_1"].e == 0.0
    assert rows["mlp_out_0"].s == 0.5


def test_pre_equals_post_for_task_arithmetic(zoo):
    base, models = zoo
    post, rp = larv(base, models, method=ta, gate="tiered")
    pre, rq = larv(base, models, method=ta, gate="tiered", apply="pre")
    np.testing.assert_array_equal(rp.s, rq.s)
    assert len(set(rp.s.tolist())) == 3  # the gate really scales
    for p in base:
        np.testing.assert_allclose(pre[p], post[p], rtol=1e-6, atol=1e-7, err_msg=p)


def test_pre_differs_for_nonlinear_merger(zoo):
    base, models = zoo

    def signmax(tau):  # nonlinear and not homogeneous in tau: sign(sum) * 0.01
        return {p: np.float32(0.01) * np.sign(t.sum(axis=0)) for p, t in tau.items()}

    post, _ = larv(base, models, method=signmax, gate="tier3")
    pre, _ = larv(base, models, method=signmax, gate="tier3", apply="pre")
    p = "visual/conv1/kernel"  # scale 0.5 unit: pre gives sign(0.5 sum) = sign(sum), post halves it
    np.testing.assert_allclose(post[p] - base[p], 0.5 * (pre[p] - base[p]), rtol=1e-5)


def test_report_fields(zoo):
    base, models = zoo
    _, res = larv(base, models, method=ta, gate="continuous")
    assert [r.depth for r in res.report()] == list(range(1, 8))
    d = res.diagnostics
    np.testing.assert_array_equal([r.e for r in res.report()], d.e)
    np.testing.assert_array_equal([r.c for r in res.report()], d.c)
    z = (d.c - d.c.mean()) / d.c.std()
    np.testing.assert_allclose([r.z for r in res.report()], z, rtol=1e-12)
    w = d.e * np.sqrt(np.arange(1, 8) / 7) / (np.log1p(np.exp(z)) + 1)
    np.testing.assert_allclose([r.w for r in res.report()], w, rtol=1e-12)
    np.testing.assert_allclose(res.s, 1 + 0.5 * np.tanh(3 * (w - 1)), rtol=1e-12)
    # depth-only schedule: no diagnostics unless asked
    _, res = larv(base, models, method=ta, gate="tier2")
    assert res.diagnostics is None and res.report()[0].e is None


def test_svc_order(zoo):
    base, models = zoo
    calls = []

    def svc(delta, tau):  # homogeneous linear stand-in: the diagnostics are scale invariant
        calls.append(1)
        return {p: np.float32(2.0) * v for p, v in delta.items()}

    a, ra = larv(base, models, method=ta, gate="tiered", svc=svc)
    b, rb = larv(base, models, method=ta, gate="tiered", svc=svc, svc_order="larv_first")
    np.testing.assert_array_equal(ra.s, rb.s)
    for p in base:
        np.testing.assert_allclose(a[p], b[p], rtol=1e-6, atol=1e-7)
    plain, _ = larv(base, models, method=ta, gate="tiered")
    p = "visual/transformer/resblocks/mlp/c_fc/kernel"
    np.testing.assert_allclose(a[p] - base[p], 2.0 * (plain[p] - base[p]), rtol=1e-4, atol=1e-7)
    assert len(calls) == 2


def test_plan_on_given_delta_and_errors(zoo):
    base, models = zoo
    delta = ta(task_vectors(base, models))
    us = dg.units({p: v.shape for p, v in base.items()})
    cache = dg.base_cache(base, us)
    diag = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(0), cache=cache)
    p1 = L.plan(base, delta, gate="tiered", diagnostics=diag)
    p2 = L.plan(base, delta, gate="tiered", cache=cache)
    assert p1.diagnostics is diag
    np.testing.assert_array_equal(p1.s, p2.s)
    np.testing.assert_array_equal(p1.e, diag.e)
    params, params2 = L.apply(base, delta, p1), L.apply(base, delta, p2)
    for p in base:
        np.testing.assert_array_equal(params[p], params2[p])
    # the one shape the scales reach the leaves in: [] unstacked, [B, 1, ..] stacked, 1 elsewhere
    scales = p1.leaf_scales(L.shapes_of(base))
    assert scales["visual/conv1/kernel"].shape == () and scales["visual/conv1/kernel"] == p1.s[0]
    q = "visual/transformer/resblocks/mlp/c_fc/kernel"
    assert scales[q].shape == (2, 1, 1) and scales[q].dtype == np.float32
    np.testing.assert_array_equal(scales[q].reshape(-1), np.float32(p1.s[[2, 5]]))
    with pytest.raises(ValueError, match="unknown apply mode"):
        larv(base, models, method=ta, apply="middle")
    with pytest.raises(ValueError, match="unknown LARV gate"):
        larv(base, models, method=ta, gate="tierd")
    with pytest.raises(ValueError, match="leaves the base lacks"):
        L.apply(base, {**delta, "visual/extra": np.zeros(3)}, p1)
    with pytest.raises(ValueError, match="unknown diagnostics option"):
        L.plan(base, delta, diag_options={"kk": 3})
    with pytest.raises(ValueError, match="different LARV units"):
        L.plan(base, delta, gate="tiered", granularity="block", diagnostics=diag)
    with pytest.raises(ValueError, match="needs the merger"):
        L.apply(base, delta, L.plan(base, delta, gate="tier3"), mode="pre")


def test_cli_flags_to_keyword_arguments(zoo):
    import argparse

    from larv_jax.cli.flags import add_larv_arguments, larv_kwargs

    base, models = zoo
    tau = task_vectors(base, models)
    delta = ta(tau)
    parser = add_larv_arguments(argparse.ArgumentParser())
    kw = larv_kwargs(parser.parse_args([]))
    assert kw == {"gate": "none", "gate_options": {}, "apply": "post", "granularity": "module",
                  "mode": "randomized", "base_mode": "exact", "seed": 0,
                  "diag_options": {"k": 64, "p": 10, "q": 2}, "svc_order": "svc_first"}
    kw = larv_kwargs(parser.parse_args(["--larv", "tiered", "--larv-set", "alpha=0.5",
                                        "--larv-set", "use_c=false", "--larv-k", "8"]))
    assert kw["gate_options"] == {"alpha": 0.5, "use_c": False}
    assert kw["diag_options"] == {"k": 8, "p": 10, "q": 2}
    p = L.plan(base, delta, gate=kw["gate"], diag_options=kw["diag_options"],
               **kw["gate_options"])
    # alpha = 0.5 puts the lower tier at ceil(0.5 * 7) = 4 units
    assert sorted(set(p.s.tolist())) == [0.5, 1.0, 1.5] and (p.s == 0.5).sum() == 4
    with pytest.raises(ValueError, match="unknown LARV gate"):
        larv_kwargs(parser.parse_args(["--larv", "bogus"]))
    with pytest.raises(ValueError, match="--larv-set expects KEY=VALUE"):
        larv_kwargs(parser.parse_args(["--larv", "tiered", "--larv-set", "alpha"]))


def test_every_registry_merger_under_larv(zoo):
    from larv_jax.merging import METHODS

    base, models = zoo
    tau = task_vectors(base, models)
    for name, fn in METHODS.items():
        plain, _ = larv(base, tau, method=name, gate="none")
        delta = fn(tau)
        for p in base:
            np.testing.assert_array_equal(plain[p], base[p] + np.asarray(delta[p], np.float32),
                                          err_msg=f"{name} {p}")
        # Iso-C's and Iso-CTS's flat spectra are SVC clusters, re-based with a warning (SPEC
        # §5); every other merger's spectra have none (a warning there is an error)
        with (pytest.warns(UserWarning, match="clusters of near-equal") if name.startswith("iso")
              else contextlib.nullcontext()):
            params, res = larv(base, tau, method=name, gate="tiered", svc=True)
        assert all(np.isfinite(v).all() for v in params.values()), name
        assert sorted(set(res.s.tolist())) == [0.5, 1.0, 1.5], name


def test_checkpoint_inputs_stream_and_match_memory(zoo, tmp_path):
    """The same plan and parameters from checkpoints on disk (streamed through the engine's
    lazy task vectors) as from the trees in memory."""
    from larv_jax.checkpoint import load_checkpoint, save_hf
    from larv_jax.merging import TaskVectors

    base, models = zoo
    save_hf(base, TINY, tmp_path / "base")
    paths = []
    for k, m in enumerate(models):
        save_hf(m, TINY, tmp_path / f"m{k}")
        paths.append(tmp_path / f"m{k}")
    ckpt = load_checkpoint(tmp_path / "base")
    for kw in ({"gate": "tiered"}, {"gate": "tiered", "apply": "pre"},
               {"gate": "continuous", "svc": True}):
        lazy = TaskVectors(ckpt, paths)
        svc = registry.bind_svc("ties") if kw.get("svc") else None
        opts = {k: v for k, v in kw.items() if k != "svc"}
        a, ra = larv_reference(ckpt.flat(native=True), lazy, registry.bind("ties"), svc=svc,
                               **opts)
        b, rb = larv(base, models, method="ties", **kw)
        np.testing.assert_array_equal(ra.s, rb.s)
        for p in base:
            np.testing.assert_array_equal(a[p], b[p], err_msg=f"{kw} {p}")


@pytest.mark.parametrize("argv,svc", [
    (["--larv", "tiered"], False),
    (["--larv", "continuous", "--larv-apply", "pre"], True),
    (["--larv", "tiered", "--larv-svc-order", "larv_first"], True),
])
def test_merge_command_matches_the_library(zoo, tmp_path, argv, svc):
    """`larv merge` (merge_delta -> plan -> apply, streaming) writes what merge -> plan -> apply
    gives in memory, in every apply mode and SVC order."""
    import json

    from larv_jax.checkpoint import load_checkpoint, save_hf
    from larv_jax.cli import main

    base, models = zoo
    save_hf(base, TINY, tmp_path / "base")
    paths = []
    for k, m in enumerate(models):
        save_hf(m, TINY, tmp_path / f"m{k}")
        paths.append(str(tmp_path / f"m{k}"))
    out = tmp_path / "out"
    assert main(["merge", "--base", str(tmp_path / "base"), "--models", *paths, "--method", "ties",
                 *argv, *(["--svc"] if svc else []), "--no-hash", "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    got = load_checkpoint(out).flat()
    opts = dict(zip(argv[::2], argv[1::2], strict=True))
    want, res = larv(base, models, method="ties", gate=opts["--larv"],
                     apply=opts.get("--larv-apply", "post"), svc=True if svc else None,
                     svc_order=opts.get("--larv-svc-order", "svc_first"))
    np.testing.assert_array_equal([u["s"] for u in report["larv"]["units"]], res.s)
    for p in base:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7, err_msg=p)


def test_merge_command_refuses_pre_with_larv_first_before_merging(zoo, tmp_path, capsys,
                                                                    monkeypatch):
    from larv_jax.checkpoint import save_hf
    from larv_jax.cli import main

    base, models = zoo
    save_hf(base, TINY, tmp_path / "base")
    save_hf(models[0], TINY, tmp_path / "m0")
    merged = []
    monkeypatch.setattr("larv_jax.merging.merge_delta", lambda *a, **k: merged.append(1))
    out = tmp_path / "out"
    assert main(["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "m0"),
                 "--method", "ties", "--svc", "--larv", "tiered", "--larv-apply", "pre",
                 "--larv-svc-order", "larv_first", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use svc_order='svc_first'" in err[0]
    assert merged == [] and not out.exists()
