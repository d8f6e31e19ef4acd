"""Bad checkpoints: clear errors naming the file and key, exit status 1, nothing written."""

import json
import shutil

import numpy as np
import pytest
from helpers import make_hf_vision

from larv_jax.checkpoint import load_checkpoint
from larv_jax.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_hf_vision(path, seed=0)
    return path


def _convert_fails(src, tmp_path, capsys, *needles):
    out = tmp_path / "out"
    assert main(["convert", str(src), "--to", "hf", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "temporary left behind"
    return err


def test_truncated_safetensors(good, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _convert_fails(bad, tmp_path, capsys, "model.safetensors", "truncated")


def test_not_safetensors(tmp_path, capsys):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    _convert_fails(f, tmp_path, capsys, "weights.safetensors", "not a safetensors file")


def test_directory_without_weights(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _convert_fails(d, tmp_path, capsys, "empty", "holds no weights")


def test_other_architecture(tmp_path, capsys):
    from safetensors.numpy import save_file

    f = tmp_path / "bert.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((10, 4), np.float32)}, str(f))
    _convert_fails(f, tmp_path, capsys, "bert.safetensors", "no CLIP vision tower")


def test_other_architecture_config(good, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "siglip_vision_model"
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(bad, tmp_path, capsys, "config.json", "siglip_vision_model")


def test_shape_mismatch_names_key(good, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights have 64
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(bad, tmp_path, capsys, "encoder.layers.0.mlp.fc1.weight", "(64, 32)", "128")


def test_missing_and_unexpected_keys(good, tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(good / "model.safetensors")
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing\.safetensors.*encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_checkpoint(tmp_path / "missing.safetensors")
    extra = {**sd, "encoder.layers.0.ls_1.gamma": np.ones(32, np.float32)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors.*unexpected key.*ls_1\.gamma"):
        load_checkpoint(tmp_path / "extra.safetensors")


def test_existing_output_refused_then_overwritten(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", str(good), "--to", "hf", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["convert", str(good), "--to", "hf", "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_bf16_and_fp16_are_upcast(good, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    sd = load_file(good / "model.safetensors")
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    save_file(half, str(tmp_path / "bf16.safetensors"))
    ckpt = load_checkpoint(tmp_path / "bf16.safetensors", act="quick_gelu")
    assert ckpt.source_dtype == "bfloat16"
    leaf = ckpt.leaf("visual/ln_pre/scale")
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, sd["pre_layrnorm.weight"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


@pytest.mark.parametrize("edit, needles", [
    (lambda cfg: [cfg], ["config.json", "must be a JSON object; got list"]),
    (lambda cfg: {**cfg, "hidden_size": "sixty-four"},
     ["config.json", "config.hidden_size must be a positive integer; got 'sixty-four'"]),
    (lambda cfg: {**cfg, "num_attention_heads": 5},
     ["config.json", "hidden_size", "not divisible by config.num_attention_heads 5"]),
    (lambda cfg: {**cfg, "num_hidden_layers": True},
     ["config.json", "config.num_hidden_layers must be a positive integer; got True"]),
    (lambda cfg: {**cfg, "patch_size": 3},
     ["config.json", "not divisible by config.patch_size 3"]),
])
def test_bad_config_json_is_one_line_naming_file_and_field(good, tmp_path, capsys, edit, needles):
    """A config.json that is a list, has a field of the wrong type, or heads that do not divide
    the width (which transformers refuses to load) is refused before anything is written."""
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(edit(cfg)))
    err = _convert_fails(bad, tmp_path, capsys, *needles)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_os_errors_are_one_line_and_long_names_work(good, tmp_path, capsys):
    """An --out below a regular file is the operating system's error on that path in one line
    (not a traceback); a legal 250-byte output name works (its temporary name used to pass the
    255-byte limit) and leaves no temporary behind."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out"
    assert main(["convert", str(good), "--to", "hf", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "afile" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    long = tmp_path / ("m" * 250)
    assert main(["convert", str(good), "--to", "hf", "--out", str(long)]) == 0
    assert (long / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_never_replaces_its_own_input(good, tmp_path, capsys):
    """`larv convert SRC --out SRC --overwrite` (or its parent) is refused like merge and
    diagnose refuse it: one line, exit 1, the input's bytes unchanged."""
    src = tmp_path / "src"
    shutil.copytree(good, src)
    before = (src / "model.safetensors").read_bytes()
    for out in (src, tmp_path):
        assert main(["convert", str(src), "--to", "hf", "--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert "would replace or sit inside the input" in err and len(err.strip().splitlines()) == 1
    assert (src / "model.safetensors").read_bytes() == before


def test_dangling_symlinks_are_named_with_their_target(good, tmp_path, capsys):
    """A symbolic link to nothing (a Hugging Face cache snapshot whose blob was deleted) is
    reported as such, naming the link and its target; it used to read as 'directory holds no
    weights' (the weights) or be skipped (config.json, the architecture then guessed)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to("../blobs/abc123")
    (snap / "config.json").symlink_to(good / "config.json")
    err = _convert_fails(snap, tmp_path, capsys, f"{snap / 'model.safetensors'}: dangling "
                         "symbolic link to ../blobs/abc123", str(tmp_path / "blobs" / "abc123"))
    assert "holds no weights" not in err and len(err.strip().splitlines()) == 1
    # the input itself a dangling link; a config.json link to nothing next to good weights
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    _convert_fails(link, tmp_path, capsys, f"{link}: dangling symbolic link to {tmp_path / 'gone'}")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "model.safetensors").symlink_to(good / "model.safetensors")
    (cfg / "config.json").symlink_to(tmp_path / "nowhere.json")
    _convert_fails(cfg, tmp_path, capsys, f"{cfg / 'config.json'}: dangling symbolic link")
    # and as a model of a merge: one line, exit 1, nothing written
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(good), "--models", str(good), str(snap), "--method",
                 "task_arithmetic", "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"larv merge: error: {snap / 'model.safetensors'}: "
                                        f"dangling symbolic link to ../blobs/abc123 (the target "
                                        f"does not exist: {tmp_path / 'blobs' / 'abc123'})"]
    assert not out.exists()
