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
        if "ablation" not in name:  # one merge each, for larv merge --config
            b = load_config(name + ":best")
            assert [m["method"] for m in b.mergers] == ["iso_cts"] and len(b.models) == len(c.models)
            assert [g["gate"] for g in b.gates] == ["tiered"] and b.out_dir.endswith("_best")
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



def _merged_bytes(out):
    return (out / "model.safetensors").read_bytes()


def test_larv_merge_config_is_the_same_merge_as_its_flags(zoo, tmp_path, capsys):
    """`larv merge --config FILE:ARG` writes, bit for bit, what the flags it stands for write; a
    flag typed beside it wins over the config's value, `--set` / `--larv-set` extend its
    options."""
    root, _, _ = zoo
    base = root / "openai" / "clip-vit-base-patch32"
    models = [root / "tanganke" / f"clip-vit-base-patch32_{t}" for t in TASKS]
    spec = f"configs/b32_ta8.py:quick,best,checkpoint_dir={root}"
    flags = ["--base", str(base), "--models", *map(str, models)]
    quick = ["--larv-k", "4", "--larv-p", "2", "--larv-q", "1"]  # the quick arg's sketch
    assert main(["merge", "--config", spec, "--out", str(tmp_path / "cfg")]) == 0
    assert main(["merge", *flags, "--method", "iso_cts", "--larv", "tiered", *quick,
                 "--out", str(tmp_path / "flags")]) == 0
    assert _merged_bytes(tmp_path / "cfg") == _merged_bytes(tmp_path / "flags")
    report = json.loads((tmp_path / "cfg" / "merge_report.json").read_text())
    assert report["config"] == spec and report["method"] == "iso_cts"
    assert report["larv"]["spec"] == "tiered" and report["larv"]["diagnostics"]["k"] == 4
    # typed flags replace the config's method and gate
    assert main(["merge", "--config", spec, "--method", "task_arithmetic", "--larv", "none",
                 "--scale", "0.5", "--out", str(tmp_path / "ta")]) == 0
    assert main(["merge", *flags, "--method", "task_arithmetic", "--scale", "0.5",
                 "--out", str(tmp_path / "ta_flags")]) == 0
    assert _merged_bytes(tmp_path / "ta") == _merged_bytes(tmp_path / "ta_flags")
    # a config's method and gate options, extended and overridden by --set / --larv-set
    cfg = tmp_path / "one_ties.py"  # a config of its own, written without larv_common
    cfg.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({\n"
        f"        'base': 'openai/clip-vit-base-patch32', 'checkpoint_dir': {str(root)!r},\n"
        f"        'models': {[f'tanganke/clip-vit-base-patch32_{t}' for t in TASKS]!r},\n"
        "        'mergers': [{'method': 'ties', 'options': {'keep': 0.5, 'scale': 0.7}}],\n"
        "        'gates': [{'gate': 'tiered', 'options': {'tiers': (0.25, 1.0, 2.0)}}],\n"
        "        'diagnostics': {'k': 4, 'p': 2, 'q': 1}, 'act': 'gelu'})\n")
    with pytest.warns(UserWarning, match="using act='gelu' as given"):  # the config's act
        assert main(["merge", "--config", str(cfg), "--set", "keep=0.3", "--larv-set",
                     "alpha=0.5", "--out", str(tmp_path / "ties")]) == 0
    with pytest.warns(UserWarning, match="using act='gelu' as given"):
        assert main(["merge", *flags, "--method", "ties", "--set", "keep=0.3", "--set",
                     "scale=0.7", "--larv", "tiered", "--larv-set", "tiers=0.25,1.0,2.0",
                     "--larv-set", "alpha=0.5", *quick, "--act", "gelu",
                     "--out", str(tmp_path / "ties_flags")]) == 0
    assert _merged_bytes(tmp_path / "ties") == _merged_bytes(tmp_path / "ties_flags")
    for name in ("ties", "ties_flags"):  # the config's act is the flag's (the base: quick_gelu)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert written["vision_config"]["hidden_act"] == "gelu"
    got = json.loads((tmp_path / "ties" / "merge_report.json").read_text())
    assert got["hparams"]["keep"] == 0.3 and got["hparams"]["scale"] == 0.7
    # --dry-run reads the config and writes nothing
    capsys.readouterr()
    assert main(["merge", "--config", spec, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert "iso_cts over K = 2" in capsys.readouterr().out and not (tmp_path / "dry").exists()


def test_larv_merge_config_errors(zoo, tmp_path, capsys):
    """A config larv merge cannot run is one line naming the file (status 1); a required flag
    that neither the command line nor a config gives is a usage error (status 2)."""
    root, _, _ = zoo
    out = tmp_path / "out"
    bad_syntax = tmp_path / "bad.py"
    bad_syntax.write_text("def get_config(arg=None)\n    return None\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(arg=None):\n    return {}['base']\n")
    cases = [
        (["--config", f"configs/b32_ta8.py:quick,checkpoint_dir={root}"],
         "2 merger(s) x 4 gate(s); larv merge takes one of each"),
        (["--config", f"configs/b32_ta8.py:quik,checkpoint_dir={root}"],
         "config arg 'quik' is not one of best, checkpoint_dir"),
        (["--config", str(tmp_path / "nope.py")], f"{tmp_path / 'nope.py'}: no such config file"),
        (["--config", str(bad_syntax)], f"{bad_syntax}: line 1: expected ':'"),
        (["--config", str(raising)], f"{raising}: raising.py line 2: KeyError: 'base'"),
        (["--config", "configs/b32_ta8.py:quick,best,checkpoint_dir=/nonexistent"],
         "checkpoint 'openai/clip-vit-base-patch32' not found"),
        (["--config", f"configs/b32_ta8_ablation.py:best,checkpoint_dir={root}"],
         "the ablation grid has no single best cell"),
    ]
    for argv, message in cases:
        assert main(["merge", *argv, "--out", str(out)]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert main(["merge", "--method", "ties", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "required: --base, --models (or --config FILE)" in err and err.count("\n") == 1
    assert main(["merge", "--config", f"configs/b32_ta8.py:quick,best,checkpoint_dir={root}",
                 "--set", "out_dir=x"]) == 1  # --set is the method's: iso_cts has no out_dir
    assert "out_dir" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
