"""Streaming engine == in-memory functions; base-only leaves copied; bad inputs raise; the CLI
writes a Hugging Face checkpoint transformers-compatible in layout (read back by our loader)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import larv_reference

from larv_jax import tree
from larv_jax.checkpoint import load_checkpoint, save_hf
from larv_jax.merging import (
    METHODS,
    TreeSource,
    apply_delta,
    merge_checkpoints,
    merge_delta,
    svc,
    svc_alpha,
)
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig

VISION = VisionConfig(width=16, layers=2, heads=2, mlp_dim=32, image_size=16, patch_size=8)
TEXT = TextConfig(width=16, layers=1, heads=2, mlp_dim=32, vocab_size=20, context_length=6,
                  eos_token_id=19)
VCFG = CLIPConfig(vision=VISION)
FULL = CLIPConfig(vision=VISION, text=TEXT, embed_dim=8)


def random_params(cfg, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {p: (scale * rng.standard_normal(s.shape)).astype(np.float32)
            for p, s in tree.flatten(abstract_params(cfg)).items()}


class FakeCkpt(TreeSource):
    """An in-memory checkpoint (a :class:`TreeSource`) that counts its leaf reads."""

    def __init__(self, flat, name, config=VCFG, dtype="float32"):
        super().__init__(flat, name, config=config, source_dtype=dtype)
        self.reads = 0

    def leaf(self, path, block=None, out=None, *, native=False):
        self.reads += 1
        return super().leaf(path, block, out, native=native)


def zoo(k=3, cfg=VCFG):
    base = random_params(cfg, 0)
    models = []
    for i in range(k):
        tau = random_params(VCFG, 100 + i, scale=0.01)
        models.append({p: base[p] + tau[p] for p in tau})
    return base, models


@pytest.mark.parametrize("name", sorted(METHODS))
def test_streaming_equals_in_memory(name):
    base, models = zoo()
    tv = {p: np.stack([m[p] - base[p] for m in models]) for p in models[0]}
    want = METHODS[name](tv, key=3) if name.startswith("dare") else METHODS[name](tv)
    kw = dict(key=3) if name.startswith("dare") else {}
    delta, report = merge_delta(FakeCkpt(base, "base"), [FakeCkpt(m, f"m{i}") for i, m in
                                                         enumerate(models)], name, **kw)
    assert set(delta) == set(want)
    for p in want:
        np.testing.assert_array_equal(delta[p], want[p], err_msg=p)
    assert report["method"] == name and report["num_tasks"] == 3
    assert report["hparams"]  # resolved defaults recorded
    if name == "iso_c":
        assert report["hparams"]["model"] == VCFG.name


def test_streaming_svc_and_apply_match():
    base, models = zoo()
    tv = {p: np.stack([m[p] - base[p] for m in models]) for p in models[0]}
    # Iso-CTS's flat spectra are clusters: SVC re-bases them and says so (SPEC §5)
    with pytest.warns(UserWarning, match="clusters of near-equal singular values"):
        want = svc(METHODS["iso_cts"](tv), tv, alpha=svc_alpha("iso_cts"))
    with pytest.warns(UserWarning, match="clusters of near-equal singular values"):
        params, report = merge_checkpoints(FakeCkpt(base, "base"),
                                           [FakeCkpt(m, f"m{i}") for i, m in enumerate(models)],
                                           "iso_cts", svc=True)
    assert report["svc"] == {"alpha": 0.2}
    for p in base:
        np.testing.assert_allclose(params[p], base[p] + want[p], rtol=1e-6, atol=1e-7, err_msg=p)


def test_base_only_leaves_copied_and_scales():
    base, models = zoo(2, cfg=FULL)
    assert any(p.startswith("text/") for p in base)
    b = FakeCkpt(base, "base", config=FULL)
    ms = [FakeCkpt(m, f"m{i}") for i, m in enumerate(models)]
    delta, report = merge_delta(b, ms, "task_arithmetic", scale=1.0)
    assert set(report["copied_from_base"]) == set(base) - set(models[0])
    assert not set(delta) & set(report["copied_from_base"])
    q = "visual/transformer/resblocks/attn/query/kernel"
    scales = {q: np.array([0.5, 2.0]).reshape(2, 1, 1), "visual/ln_post/bias": 0.0}
    params = apply_delta(b, delta, scales=scales)
    for p in base:
        if p.startswith("text/") or p == "logit_scale" or p == "visual/ln_post/bias":
            np.testing.assert_array_equal(params[p], base[p])
    tau = sum(m[q] - base[q] for m in models)
    np.testing.assert_allclose(params[q][0], base[q][0] + 0.5 * tau[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params[q][1], base[q][1] + 2.0 * tau[1], rtol=1e-5, atol=1e-6)
    for bad in (np.ones(3), np.ones(2)):  # not [B, 1, 1]
        with pytest.raises(ValueError, match="per block"):
            apply_delta(b, delta, scales={q: bad})


def test_bad_inputs_name_file_and_key():
    base, models = zoo(2)
    b = FakeCkpt(base, "base.safetensors")
    k = "visual/ln_pre/bias"
    short = {p: v for p, v in models[1].items() if p != k}
    with pytest.raises(ValueError, match=r"m1.*lacks.*ln_pre/bias"):
        merge_delta(b, [FakeCkpt(models[0], "m0"), FakeCkpt(short, "m1")], "ties")
    bad_shape = dict(models[1], **{k: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"m1.*ln_pre/bias.*shape"):
        merge_delta(b, [FakeCkpt(models[0], "m0"), FakeCkpt(bad_shape, "m1")], "ties")
    nan = dict(models[1], **{k: np.full(16, np.nan, np.float32)})
    with pytest.raises(ValueError, match=r"m1.*ln_pre/bias.*NaN"):
        merge_delta(b, [FakeCkpt(models[0], "m0"), FakeCkpt(nan, "m1")], "task_arithmetic")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        merge_delta(b, [FakeCkpt(m, "m") for m in models], "ties", lam=0.3)
    with pytest.raises(ValueError, match="valid"):
        merge_delta(b, [FakeCkpt(m, "m") for m in models], "ties_v2")
    with pytest.raises(ValueError, match="models is empty"):
        merge_delta(b, [], "ties")


def test_streaming_reads_one_leaf_at_a_time():
    base, models = zoo(3)
    ms = [FakeCkpt(m, f"m{i}") for i, m in enumerate(models)]
    merge_delta(FakeCkpt(base, "b"), ms, "ties")
    # three passes (histogram, bucket gather, merge), each reading every leaf once per model
    assert all(m.reads == 3 * len(base) for m in ms)


def test_cli_merge_roundtrip(tmp_path):
    from larv_jax.cli import main

    base, models = zoo(2, cfg=FULL)
    save_hf(base, FULL, tmp_path / "base")
    for i, m in enumerate(models):   # CLIPVisionModel fine-tunes, stored in fp16
        save_hf(m, VCFG, tmp_path / f"m{i}", dtype=np.float16)
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "m0"),
            str(tmp_path / "m1"), "--method", "ties", "--scale", "0.5", "--set", "keep=0.3",
            "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["hparams"]["scale"] == 0.5 and report["hparams"]["keep"] == 0.3
    assert len(report["upcast_to_float32"]) == 2
    assert all(len(f["sha256"]) == 64 for d in report["inputs"]["models"] for f in d["files"])
    got = load_checkpoint(out).flat()
    m16 = [{p: v.astype(np.float16).astype(np.float32) for p, v in m.items()} for m in models]
    tv = {p: np.stack([m[p] - base[p] for m in m16]) for p in models[0]}
    want = METHODS["ties"](tv, scale=0.5, keep=0.3)
    for p in base:
        np.testing.assert_allclose(got[p], base[p] + want.get(p, 0), rtol=1e-5, atol=1e-6,
                                   err_msg=p)
    assert main(argv) == 1            # existing --out refused
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv + ["--overwrite", "--method", "iso_c"]) == 1    # iso_c has no `keep`
    assert main(argv + ["--overwrite", "--set", "keep"]) == 1


def test_cli_merge_with_larv_matches_library(tmp_path):
    """`larv merge --larv tiered` writes what merge -> plan -> apply computes in memory, and
    reports every unit."""
    from larv_jax.cli import main
    from larv_jax.merging import registry

    base, models = zoo(3, cfg=FULL)
    save_hf(base, FULL, tmp_path / "base")
    for i, m in enumerate(models):
        save_hf(m, VCFG, tmp_path / f"m{i}")
    out = tmp_path / "merged"
    paths = [str(tmp_path / f"m{i}") for i in range(3)]
    assert main(["merge", "--base", str(tmp_path / "base"), "--models", *paths,
                 "--method", "task_arithmetic", "--larv", "tiered", "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    units = report["larv"]["units"]
    assert len(units) == 1 + 3 * VISION.layers          # module granularity, no projection unit
    assert {"name", "depth", "e", "c", "z", "w", "s"} <= set(units[0])
    assert sorted({u["s"] for u in units}) <= [0.5, 1.0, 1.5]
    tau = {p: np.stack([m[p] - base[p] for m in models]) for p in models[0]}
    want, res = larv_reference(base, tau, registry.bind("task_arithmetic"),
                               gate="tiered")
    got = load_checkpoint(out).flat()
    for p in got:
        np.testing.assert_allclose(got[p], np.asarray(want[p]), rtol=1e-6, atol=1e-7, err_msg=p)
    assert [u["s"] for u in units] == [float(r.s) for r in res.report()]
    # the veneer changed something: not every unit is at scale 1
    assert any(u["s"] != 1.0 for u in units)


def test_cli_merge_larv_base_cache_prefetch(tmp_path, monkeypatch):
    """`larv merge --larv` computes the base cache in a thread during the merge and uses it; a
    prefetch that failed is recomputed in place: the written model is the same bit for bit."""
    import threading
    from concurrent.futures import Future

    from larv_jax import diagnostics as dg
    from larv_jax.cli import main
    from larv_jax.cli import merge as merge_cli

    base, models = zoo(3, cfg=FULL)
    save_hf(base, FULL, tmp_path / "base")
    for i, m in enumerate(models):
        save_hf(m, VCFG, tmp_path / f"m{i}")
    paths = [str(tmp_path / f"m{i}") for i in range(3)]
    real_cache = dg.base_cache
    threads = []

    def counting_cache(*a, **kw):
        threads.append(threading.current_thread().name)
        return real_cache(*a, **kw)

    monkeypatch.setattr(dg, "base_cache", counting_cache)

    def run(name):
        out = tmp_path / name
        assert main(["merge", "--base", str(tmp_path / "base"), "--models", *paths, "--method",
                     "task_arithmetic", "--larv", "tiered", "--out", str(out)]) == 0
        return load_checkpoint(out).flat(), json.loads((out / "merge_report.json").read_text())

    got, report = run("prefetched")
    assert threads == ["larv-base-cache_0"]              # once, in the background thread
    assert report["larv"]["base_cache_overlapped_s"] > 0

    def failed(base_path, units, lk, act):
        fut = Future()
        fut.set_exception(RuntimeError("prefetch failed"))
        return fut

    for name, start in (("failed", failed),):
        threads.clear()
        monkeypatch.setattr(merge_cli, "_start_base_cache", start)
        again, rep = run(name)
        assert rep["larv"]["base_cache_overlapped_s"] is None
        assert threads[-1] == "MainThread"               # recomputed in the command's thread
        assert rep["larv"]["units"] == report["larv"]["units"]
        for p in got:
            np.testing.assert_array_equal(again[p], got[p], err_msg=f"{name}: {p}")


def test_compile_cache_dir_resolution(monkeypatch, tmp_path):
    from larv_jax.cli import compile_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    from larv_jax.caches import base_cache_dir

    monkeypatch.setenv("LARV_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache_dir() == str(tmp_path / "c" / "jax")
    assert base_cache_dir() == tmp_path / "c" / "larv-base"
    for off in ("off", "0", "", "None"):
        monkeypatch.setenv("LARV_JAX_CACHE_DIR", off)
        assert compile_cache_dir() is None and base_cache_dir() is None
    monkeypatch.delenv("LARV_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == str(tmp_path / "xdg" / "larv_jax" / "jax")
    assert base_cache_dir() == tmp_path / "xdg" / "larv_jax" / "larv-base"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the user's wins
    assert compile_cache_dir() is None
    assert base_cache_dir() == tmp_path / "xdg" / "larv_jax" / "larv-base"  # not JAX's business


def test_cli_persistent_compilation_cache(tmp_path):
    """A fresh `larv merge --larv` process fills the JAX compilation cache and the LARV base
    cache; a second one reads the base cache and writes the same model bit for bit;
    LARV_JAX_CACHE_DIR=off leaves no cache behind."""
    import json
    import os
    import subprocess
    import sys

    base, models = zoo(2)
    save_hf(base, VCFG, tmp_path / "base")
    for i, m in enumerate(models):
        save_hf(m, VCFG, tmp_path / f"m{i}")
    cache = tmp_path / "jaxcache"

    def run(out, cache_env):
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["LARV_JAX_CACHE_DIR"] = cache_env
        env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # where the default would go
        cmd = [sys.executable, "-m", "larv_jax", "merge", "--base", str(tmp_path / "base"),
               "--models", str(tmp_path / "m0"), str(tmp_path / "m1"), "--method",
               "task_arithmetic", "--larv", "tiered", "--out", str(tmp_path / out)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((tmp_path / out / "merge_report.json").read_text())
        run.stderr = r.stderr
        return load_checkpoint(tmp_path / out).flat(), report["larv"]["base_cache_source"]

    first, source = run("a", str(cache))
    entries = [p for p in (cache / "jax").rglob("*") if p.is_file()]
    assert entries, "no compilation cache entries written"
    (stored,) = (cache / "larv-base").glob("*.npz")
    assert source == "computed"
    second, source = run("b", str(cache))
    assert source == str(stored)
    # the second run may add entries (which functions pass the cache's minimum compile time
    # depends on the machine's load), never remove one: a superset, compared as sets (sorted
    # lists compared lexicographically, which failed whenever a new entry sorted first)
    assert {p for p in (cache / "jax").rglob("*") if p.is_file()} >= set(entries)
    for p in first:
        np.testing.assert_array_equal(second[p], first[p], err_msg=p)
    # A damaged store file: one warning line naming it, recomputed, the same model.
    stored.write_bytes(b"junk")
    third, source = run("d", str(cache))
    assert source == "computed"
    warned = [ln for ln in run.stderr.splitlines() if "warning" in ln]
    assert warned == [f"larv: warning: LARV base cache {stored} is unreadable "
                      "(not an .npz file); recomputing it"]
    for p in first:
        np.testing.assert_array_equal(third[p], first[p], err_msg=p)
    _, source = run("c", "off")
    assert source == "computed" and not (tmp_path / "xdg").exists()


def test_plain_merge_command_never_imports_jax(tmp_path):
    """`larv merge` without --larv imports neither jax nor the diagnostics (a fresh process;
    0.5-1.5 s and ~150 MB of every merge otherwise), and with --larv it does."""
    import os
    import subprocess
    import sys

    base, models = zoo(2)
    save_hf(base, VCFG, tmp_path / "base")
    for i, m in enumerate(models):
        save_hf(m, VCFG, tmp_path / f"m{i}")
    code = ("import sys; from larv_jax.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'jax' in sys.modules, 'larv_jax.diagnostics' in sys.modules)")
    env = {**os.environ, "LARV_JAX_CACHE_DIR": "off"}
    for extra, want in (([], "0 False False"), (["--larv", "linear"], "0 True True")):
        argv = ["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "m0"),
                str(tmp_path / "m1"), "--method", "ties", "--no-hash", "--overwrite",
                "--out", str(tmp_path / "out"), *extra]
        r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == want, extra


@pytest.mark.parametrize("key", ["visual/transformer/resblocks/mlp/c_fc/kernel",
                                 "visual/conv1/kernel"])
def test_task_vector_overflow_names_the_model_file_and_key(tmp_path, capsys, key):
    """Finite weights whose difference from the base overflows float32 (3e38 - -3e38): one line
    naming the fine-tuned model's file and the key, exit 1, nothing written; through the raw
    chunked reads (c_fc, stored float32 as is) and the converting ones (conv1, which was not
    checked at all), for the sum-only methods (task_sum) and the stacking ones (TIES)."""
    from larv_jax.cli import main

    base, models = zoo(2)
    base[key] = base[key].copy()
    base[key].flat[5] = -3e38
    models[1][key] = models[1][key].copy()
    models[1][key].flat[5] = 3e38
    save_hf(base, VCFG, tmp_path / "base")
    for i, m in enumerate(models):
        save_hf(m, VCFG, tmp_path / f"m{i}")
    raw = load_checkpoint(tmp_path / "m1").raw_layout(key) is not None
    assert raw == (key != "visual/conv1/kernel")  # both read paths covered
    for method in ("task_arithmetic", "ties"):
        out = tmp_path / "out"
        assert main(["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "m0"),
                     str(tmp_path / "m1"), "--method", method, "--no-hash", "--no-progress",
                     "--quiet", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            f"larv merge: error: {tmp_path / 'm1'}: {key!r}: the task vector (this model minus "
            f"the base {tmp_path / 'base'}) is not finite: the difference of finite weights "
            "overflows float32"], method
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name[0] == "."]
