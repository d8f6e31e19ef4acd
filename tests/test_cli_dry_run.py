"""``--dry-run`` on ``larv merge``, ``diagnose`` and ``eval``: the real run's checks, the plan
printed, nothing written; on a bad input the same error and exit status as the real run."""

import json
import shutil

import numpy as np
import pytest

from larv_jax.checkpoint import save_hf
from larv_jax.cli import main
from larv_jax.models.clip import init_params
from larv_jax.models.config import CLIPConfig, VisionConfig
from larv_jax.tree import flatten, unflatten

SMALL = CLIPConfig(vision=VisionConfig(width=32, layers=2, heads=2, mlp_dim=128, patch_size=4,
                                       image_size=8), name="small")
WIDE = CLIPConfig(vision=VisionConfig(width=64, layers=2, heads=2, mlp_dim=128, patch_size=4,
                                      image_size=8), name="wide")


def _save(flat, cfg, path):
    save_hf(unflatten({k: np.asarray(v) for k, v in flat.items()}), cfg, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(root, base, [ft0, ft1], {bad input: path}) of tiny HF vision checkpoints."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("dry")
    base = {k: np.asarray(v) for k, v in flatten(init_params(SMALL)).items()}
    rng = np.random.default_rng(0)
    models = [_save({k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                     for k, v in base.items()}, SMALL, root / f"ft{i}") for i in range(2)]
    bad = {"shape": _save(flatten(init_params(WIDE)), WIDE, root / "wide_model")}
    # a fine-tune that lacks one tensor (a block's fc1 bias) of the others
    missing = root / "missing_key"
    missing.mkdir()
    shutil.copy(models[0] / "config.json", missing / "config.json")
    sd = load_file(models[0] / "model.safetensors")
    (key,) = [k for k in sd if k.endswith("layers.1.mlp.fc1.bias")]
    save_file({k: v for k, v in sd.items() if k != key}, missing / "model.safetensors")
    bad["key"] = missing
    return root, _save(base, SMALL, root / "base"), models, bad


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("cmd", ["merge", "diagnose"])
def test_dry_run_writes_nothing_and_prints_the_plan(cmd, ckpts, capsys):
    root, base, models, _ = ckpts
    out = root / f"out_{cmd}"
    extra = ["--method", "ties", "--larv", "tiered"] if cmd == "merge" else ["--k", "4"]
    argv = [cmd, "--base", str(base), "--models", *map(str, models), *extra, "--out", str(out)]
    before = _listing(root)
    assert main([*argv, "--dry-run"]) == 0
    assert _listing(root) == before  # nothing written, not even a temporary
    text = capsys.readouterr().out
    assert "nothing written" in text and str(out / "config.json" if cmd == "merge" else
                                             out / "diagnostics.json") in text
    assert "peak memory" in text
    # --json: the plan is the document; its memory estimate is the buffers' sum, from shapes
    assert main([*argv, "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is True and doc["ok"] and doc["outputs"] == []
    plan = doc["plan"]
    assert [r["role"] for r in plan["reads"]] == ["base", "model", "model"]
    n = sum(int(np.prod(v.shape)) for v in flatten(init_params(SMALL)).values())
    assert all(r["parameters"] == n for r in plan["reads"])
    mem = plan["memory"]
    assert mem["peak_bytes"] == sum(mem["parts"].values()) > 4 * n
    assert _listing(root) == before
    # and the real run then does what the plan said it would write
    assert main(argv) == 0
    assert sorted(str(p) for p in out.iterdir()) == sorted(plan["writes"])


@pytest.mark.parametrize("cmd", ["merge", "diagnose"])
@pytest.mark.parametrize("bad", ["key", "shape", "out exists"])
def test_dry_run_fails_as_the_real_run_does(cmd, bad, ckpts, tmp_path, capsys):
    root, base, models, bads = ckpts
    out = tmp_path / "out"
    if bad == "out exists":
        out.mkdir()
        ms = models
    else:
        ms = [models[0], bads[bad]]
    extra = ["--method", "ties"] if cmd == "merge" else []
    argv = [cmd, "--base", str(base), "--models", *map(str, ms), *extra, "--out", str(out)]
    before = _listing(tmp_path)
    results = []
    for dry in (["--dry-run"], []):
        rc = main([*argv, *dry])
        results.append((rc, capsys.readouterr().err))
    assert results[0] == results[1] and results[0][0] == 1, results
    err = results[0][1]
    assert err.count("\n") == 1 and err.startswith(f"larv {cmd}: error: ")
    assert {"key": "fc1" in err or "c_fc" in err, "shape": "shape" in err,
            "out exists": "exists" in err}[bad], err
    assert _listing(tmp_path) == before


def test_eval_dry_run_and_a_wrong_data_dir(tmp_path, capsys):
    import tensorflow_datasets as tfds
    from test_eval_cli import CFG, _tokenizer_json, jax_to_np

    clip = tmp_path / "clip"
    save_hf(jax_to_np(init_params(CFG, seed=4)), CFG, clip,
            extra_files={"tokenizer.json": _tokenizer_json()})
    out = tmp_path / "out"
    argv = ["eval", "--clip", str(clip), "--tasks", "mnist,pcam", "--limit", "5",
            "--batch-size", "4", "--threads", "1", "--corruptions", "contrast", "--out", str(out)]
    before = _listing(tmp_path)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        assert main([*argv, "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert _listing(tmp_path) == before
    plan = doc["plan"]
    data = [r for r in plan["reads"] if r["role"].startswith("data ")]
    assert [(r["role"], r["examples"]) for r in data] == [("data mnist", 5), ("data pcam", 5)]
    assert "10 images" in " ".join(plan["computes"]) or "20 images" in " ".join(plan["computes"])
    # a data directory without the datasets: the same one-line error, dry or not, nothing written
    bad = [*argv, "--data-dir", str(tmp_path / "no_tfds_here")]
    results = []
    for dry in (["--dry-run"], []):
        rc = main([*bad, *dry])
        results.append((rc, capsys.readouterr().err))
    assert results[0] == results[1] and results[0][0] == 1
    assert "not prepared under data_dir" in results[0][1] and "mnist" in results[0][1]
    assert _listing(tmp_path) == before
