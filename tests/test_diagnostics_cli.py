"""``larv diagnose`` end to end on tiny HF checkpoints, and its refusals."""

import json

import jax
import numpy as np
import pytest

from larv_jax import diagnostics as dg
from larv_jax.checkpoint import save_hf
from larv_jax.cli import main
from larv_jax.models.clip import init_params
from larv_jax.models.config import CLIPConfig, VisionConfig
from larv_jax.tree import flatten, unflatten

SMALL = CLIPConfig(vision=VisionConfig(width=32, layers=2, heads=2, mlp_dim=128, patch_size=4,
                                       image_size=8), name="small")


def _save(flat, cfg, path):
    save_hf(unflatten({k: np.asarray(v) for k, v in flat.items()}), cfg, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    base = {k: np.asarray(v) for k, v in flatten(init_params(SMALL)).items()}
    rng = np.random.default_rng(0)
    models = []
    for i in range(2):
        ft = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in base.items()}
        models.append(_save(ft, SMALL, root / f"ft{i}"))
    return root, _save(base, SMALL, root / "base"), models, base


def test_diagnose_writes_json_csv_png_matching_the_library(ckpts, tmp_path):
    root, base_dir, models, base = ckpts
    out = tmp_path / "diag"
    rc = main(["diagnose", "--base", str(base_dir), "--models", *map(str, models),
               "--seed", "3", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["diagnostics.csv", "diagnostics.json",
                                                     "diagnostics.png"]
    js = json.loads((out / "diagnostics.json").read_text())
    assert js["num_units"] == 7 and js["settings"]["merge"]["method"] == "task_arithmetic"
    # Same numbers as the library on TA (lam 0.3) computed here from the saved weights.
    from larv_jax.checkpoint import load_params

    taus = [flatten(load_params(m)[1]) for m in models]
    base_rt = flatten(load_params(base_dir)[1])
    delta = {k: 0.3 * sum(t[k] - base_rt[k] for t in taus) for k in base_rt}
    us = dg.units({k: v.shape for k, v in base_rt.items()})
    ref = dg.diagnose(base_rt, delta, units=us, key=jax.random.PRNGKey(3))
    np.testing.assert_allclose([u["e"] for u in js["units"]], ref.e, rtol=1e-4)
    np.testing.assert_allclose([u["c"] for u in js["units"]], ref.c, rtol=1e-4)


def test_bad_inputs_exit_nonzero_and_write_nothing(ckpts, tmp_path, capsys):
    root, base_dir, models, base = ckpts
    out = tmp_path / "diag"
    assert main(["diagnose", "--base", str(base_dir), "--models", "--out", str(out)]) != 0
    assert "at least one" in capsys.readouterr().err
    # A model whose fc1 has a NaN: the error names the file and the parameter.
    bad = dict(base)
    p = "visual/transformer/resblocks/mlp/c_fc/kernel"
    bad[p] = bad[p].copy()
    bad[p][0, 0, 0] = np.nan
    bad_dir = _save(bad, SMALL, tmp_path / "nan_model")
    assert main(["diagnose", "--base", str(base_dir), "--models", str(bad_dir),
                 "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "nan_model" in err and "c_fc/kernel" in err and ("NaN" in err or "non-finite" in err)
    # A model of another width: shapes differ.
    wide = CLIPConfig(vision=VisionConfig(width=64, layers=2, heads=2, mlp_dim=128,
                                          patch_size=4, image_size=8), name="wide")
    wide_dir = _save(flatten(init_params(wide)), wide, tmp_path / "wide_model")
    assert main(["diagnose", "--base", str(base_dir), "--models", str(wide_dir),
                 "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "wide_model" in err and "shape" in err
    assert not out.exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".diag")]


def test_vision_only_finetunes_of_a_full_clip_base(tmp_path):
    """The zoo's layout: a full CLIP base (text tower, visual projection) and CLIPVisionModel
    fine-tunes, which carry no projection. Units cover what the merge covers (no proj unit)."""
    from larv_jax.models.config import TextConfig

    full = CLIPConfig(vision=SMALL.vision, text=TextConfig(width=16, layers=1, heads=2, mlp_dim=32,
                                                           vocab_size=20, context_length=6,
                                                           eos_token_id=19),
                      embed_dim=8, name="small_full")
    base = {k: np.asarray(v) for k, v in flatten(init_params(full)).items()}
    assert "visual/proj/kernel" in base
    vcfg = full.vision_only()
    rng = np.random.default_rng(1)
    vision_keys = {k for k in flatten(init_params(vcfg))}
    assert "visual/proj/kernel" not in vision_keys
    models = [_save({k: base[k] + 0.01 * rng.standard_normal(base[k].shape).astype(np.float32)
                     for k in vision_keys}, vcfg, tmp_path / f"ft{i}") for i in range(2)]
    base_dir = _save(base, full, tmp_path / "base")
    out = tmp_path / "diag"
    assert main(["diagnose", "--base", str(base_dir), "--models", *map(str, models),
                 "--out", str(out)]) == 0
    js = json.loads((out / "diagnostics.json").read_text())
    assert js["num_units"] == 7  # patch + 3 per block; no unit for the untouched projection
    assert all(np.isfinite(u["e"]) and np.isfinite(u["c"]) for u in js["units"])


def test_diagnose_and_merge_never_replace_an_input_or_an_existing_out(ckpts, tmp_path, capsys):
    """`larv diagnose --out` refuses an existing directory without --overwrite (it replaced it
    silently before), and diagnose and merge refuse an --out that is, holds or sits inside an
    input even with --overwrite: the input's weights stay on disk, untouched."""
    root, base_dir, models, _ = ckpts
    args = ["--base", str(base_dir), "--models", *map(str, models)]
    out = tmp_path / "diag"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["diagnose", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exists (pass --overwrite to replace it)" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["diagnose", *args, "--out", str(out), "--overwrite"]) == 0
    assert (out / "diagnostics.json").exists() and not (out / "keep.txt").exists()

    weights = models[0] / "model.safetensors"
    before = weights.read_bytes()
    for cmd in ("diagnose", "merge"):
        extra = ["--method", "task_arithmetic"] if cmd == "merge" else []
        for target in (models[0], root, models[0] / "sub"):
            assert main([cmd, *args, *extra, "--out", str(target), "--overwrite"]) == 1
            err = capsys.readouterr().err
            assert "would replace or sit inside the input" in err, (cmd, target, err)
    assert weights.read_bytes() == before
    assert not (models[0] / "sub").exists()
