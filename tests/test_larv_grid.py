"""Experiment grids (``larv run``) on tiny random HF-format checkpoints: reuse and results."""

import collections
import json

import numpy as np
import pytest
from helpers import larv_reference

from larv_jax import diagnostics as dg
from larv_jax import tree as ltree
from larv_jax.checkpoint import save_hf
from larv_jax.cli import main
from larv_jax.larv import grid
from larv_jax.merging import task_vectors
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig

TINY = CLIPConfig(vision=VisionConfig(width=16, layers=2, heads=2, mlp_dim=32, image_size=16,
                                      patch_size=8),
                  text=TextConfig(width=16, layers=1, heads=2, mlp_dim=32, vocab_size=64,
                                  context_length=8, eos_token_id=63, pad_token_id=1),
                  embed_dim=8, name="tiny")
TASKS = ("sun397", "stanford-cars")


def _random(shape_tree, rng, scale=0.1):
    return {p: (rng.normal(0, scale, s.shape)).astype(np.float32)
            for p, s in ltree.flatten(shape_tree).items()}


def _reference_ta(tau):
    return {p: np.float32(0.3) * np.asarray(t).sum(axis=0) for p, t in tau.items()}


def _reference_ties_like(tau):  # a second, nonlinear merger: elementwise max-magnitude
    out = {}
    for p, t in tau.items():
        t = np.asarray(t)
        idx = np.abs(t).argmax(axis=0)
        out[p] = np.take_along_axis(t, idx[None], axis=0)[0]
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny full-CLIP base and two vision-only fine-tunes, under HF-id directories."""
    root = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    base = _random(abstract_params(TINY), rng)
    save_hf(base, TINY, root / "openai" / "clip-vit-base-patch32")
    vision_cfg = TINY.vision_only()
    models = []
    for task in TASKS:
        m = {p: v + rng.normal(0, 0.01, v.shape).astype(np.float32)
             for p, v in base.items() if p.startswith("visual/") and p != "visual/proj/kernel"}
        save_hf(m, vision_cfg, root / "tanganke" / f"clip-vit-base-patch32_{task}")
        models.append(m)
    return root, base, models


@pytest.fixture
def counting(monkeypatch):
    counts = collections.Counter()
    real_diag, real_cache = dg.diagnose, dg.base_cache

    def diagnose(*a, **k):
        counts["diagnose"] += 1
        return real_diag(*a, **k)

    def base_cache(*a, **k):
        counts["base_cache"] += 1
        return real_cache(*a, **k)

    monkeypatch.setattr(dg, "diagnose", diagnose)
    monkeypatch.setattr(dg, "base_cache", base_cache)
    return counts


def test_run_grid_reuses_diagnostics(zoo, counting):
    _, base, models = zoo
    tau = task_vectors(base, models)
    resolve = {"ta": lambda: _reference_ta, "mx": lambda: _reference_ties_like}
    merge_calls = collections.Counter()

    def resolver(name):
        fn = resolve[name]()

        def merge(t):
            merge_calls[name] += 1
            return fn(t)

        return merge

    gates = [{"gate": "none"}, {"gate": "tiered"}, {"gate": "continuous"}, {"gate": "tier3"},
             {"gate": "tiered", "apply": "pre"}, {"gate": "tiered", "options": {"use_c": False}}]
    counters = collections.Counter()
    rows = list(grid.run_grid(base=base, tau=tau, mergers=[{"method": "ta"}, {"method": "mx"}],
                              gates=gates, resolve_merger=resolver, counters=counters,
                              diag_options={"k": 4, "p": 2, "q": 1}))
    assert len(rows) == 12
    # one base cache, one diagnostics run per merger; one merge per merger plus one per pre cell
    assert counting == {"base_cache": 1, "diagnose": 2}
    assert merge_calls == {"ta": 2, "mx": 2}
    assert counters["merge"] == 4 and counters["diagnostics"] == 2
    # every cell agrees with merge -> plan -> apply of the same setting, run here on its own
    for row, g in zip(rows[:6], gates, strict=True):
        params, res = larv_reference(base, tau, _reference_ta, gate=g["gate"],
                                     apply=g.get("apply", "post"),
                                     diag_options={"k": 4, "p": 2, "q": 1},
                                     **g.get("options", {}))
        np.testing.assert_array_equal(row["s"], res.s)
        norm = np.sqrt(sum(np.sum((params[p] - base[p]).astype(np.float64) ** 2) for p in base))
        assert row["update_norm"] == pytest.approx(norm, rel=1e-9)
    # L = 1 + 3 * 2 vision units (visual/proj is not merged, so not a unit)
    assert len(rows[1]["units"]) == 7 and rows[1]["units"][0]["name"] == "patch"
    assert rows[0]["tiers"] == {"1": 7}


def test_larv_run_cli_quick(zoo, counting, tmp_path, capsys):
    root, base, models = zoo
    out = tmp_path / "out"
    rc = main(["run", "--config", f"configs/b32_ta8.py:quick,checkpoint_dir={root}",
               "--out-dir", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4  # quick: 2 mergers x 4 gates
    assert counting == {"base_cache": 1, "diagnose": 2}
    by = {(r["merger"], r["gate"], r["apply"]): r for r in rows}
    # the plain TA cell equals theta0 + 0.3 sum tau computed here from the saved models
    ta = by[("ta", "none", "post")]
    want = np.sqrt(sum(np.sum((0.3 * sum(m[p].astype(np.float64) - base[p] for m in models)) ** 2)
                       for p in models[0]))
    assert ta["update_norm"] == pytest.approx(want, rel=1e-5)
    assert ta["s"] == [1.0] * 7
    # pre == post for TA (linear)
    post, pre = by[("ta", "tiered", "post")], by[("ta", "tiered", "pre")]
    assert post["s"] == pre["s"]
    assert pre["update_norm"] == pytest.approx(post["update_norm"], rel=1e-5)
    assert post["tiers"] == {"0.5": 3, "1": 2, "1.5": 2}
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + 8 and md[0].startswith("| merger")
    assert (out / "diagnostics_ta.json").exists() and (out / "config.json").exists()
    # refusing to overwrite, then --dry-run prints the grid
    assert main(["run", "--config", f"configs/b32_ta8.py:quick,checkpoint_dir={root}",
                 "--out-dir", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["run", "--config", "configs/b32_ta8_ablation.py:quick",
                 "--checkpoint-dir", str(root), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("  cell ") == 2 * 15


def test_every_shipped_config_loads():
    import glob

    from larv_jax.cli.run import load_config

    names = sorted(glob.glob("configs/*.py"))
    assert len([n for n in names if "larv_common" not in n]) == 10
    for name in names:
        if "larv_common" in name:
            continue
        text = open(name).read()
        assert text.startswith(f'"""larv run --config {name}'), name
        c = load_config(name)
        assert len(c.models) == len(c.tasks) == {"ta8": 8, "tall14": 14, "tall20": 20}[
            name.split("_")[1].removesuffix(".py")]
        assert c.models[0].startswith("tanganke/clip-vit-") and c.base.startswith("openai/")
        q = load_config(name + ":quick")
        assert len(q.models) == 2 and q.diagnostics.k == 4
    c = load_config("configs/l14_tall20.py", ["diagnostics.k=32", "granularity=block"])
    assert c.diagnostics.k == 32 and c.granularity == "block"
    assert c.models[-1] == "tanganke/clip-vit-large-patch14_rendered-sst2"
    with pytest.raises(ValueError, match="no field"):
        load_config("configs/b32_ta8.py", ["nope=1"])


def test_resolve_checkpoint(tmp_path):
    from larv_jax.cli.run import resolve_checkpoint

    (tmp_path / "org" / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "models--org--c" / "snapshots" / "abc").mkdir(parents=True)
    assert resolve_checkpoint("org/a", tmp_path) == tmp_path / "org" / "a"
    assert resolve_checkpoint("org/b", tmp_path) == tmp_path / "b"
    assert resolve_checkpoint("org/c", tmp_path) == tmp_path / "models--org--c" / "snapshots" / "abc"
    with pytest.raises(FileNotFoundError, match="org/d"):
        resolve_checkpoint("org/d", tmp_path)

