"""``larv eval`` end to end on a tiny saved CLIP (with a tokenizer.json) over TFDS mock data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from larv_jax.checkpoint import load_params, save_hf
from larv_jax.cli import main
from larv_jax.eval.zero_shot import evaluate
from larv_jax.models.clip import init_params
from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from larv_jax.models.tokenizer import load_tokenizer

CFG = CLIPConfig(
    vision=VisionConfig(width=32, layers=1, heads=4, mlp_dim=64, image_size=32, patch_size=16),
    text=TextConfig(width=32, layers=1, heads=4, mlp_dim=64, vocab_size=64, context_length=16,
                    eos_token_id=63, pad_token_id=63),
    embed_dim=16, name="tiny")


def _tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,:\"'!-/"
    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(chars)},
             "<|startoftext|>": 62, "<|endoftext|>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tok.to_str()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip") / "tiny"
    params = jax_to_np(init_params(CFG, seed=4))
    save_hf(params, CFG, d, extra_files={"tokenizer.json": _tokenizer_json()})
    return d


def jax_to_np(tree):
    return {k: jax_to_np(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def test_cli_report_matches_library(clip_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "--clip", str(clip_dir), "--tasks", "pcam,mnist", "--limit", "12",
            "--batch-size", "8", "--threads", "1", "--corruptions", "contrast,jpeg",
            "--finetuned", str(clip_dir), str(clip_dir), "--out", str(out)]
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        assert main(argv) == 0
        cfg, params = load_params(clip_dir)
        tok = load_tokenizer(clip_dir, cfg.text.context_length)
        lib = evaluate(params, params, cfg, ["pcam", "mnist"], tokenizer=tok, batch_size=8,
                       limit=12, num_threads=1)
    report = json.loads((out / "eval.json").read_text())
    for t in ("pcam", "mnist"):
        assert report["clean"]["tasks"][t]["n"] == 12
        assert report["clean"]["tasks"][t]["top1"] == lib["tasks"][t]["top1"]
        # the "fine-tuned" model is the evaluated model itself: normalized accuracy 1 (or nan at 0)
        acc = report["clean"]["tasks"][t]["top1"]
        assert report["finetuned"][t] == acc
        norm = report["normalized"]["tasks"][t]
        assert norm == 1.0 if acc > 0 else norm is None or np.isnan(norm)
    assert report["clean"]["average"] == pytest.approx(lib["average"])
    assert set(report["corruptions"]) == {"contrast", "jpeg"}
    assert report["severity"] == 3 and report["corruption_table"] == "cifar"
    md = (out / "eval.md").read_text()
    assert "| pcam |" in md and "**average**" in md and "| contrast | jpeg |" in md
    assert list((out / "heads").rglob("*.npz"))  # heads cached under <out>/heads


def test_cli_errors(clip_dir, tmp_path, capsys):
    base = ["eval", "--clip", str(clip_dir), "--out", str(tmp_path / "o")]
    assert main(base + ["--tasks", "mnist,nope"]) == 1
    assert "valid" in capsys.readouterr().err
    assert main(base + ["--tasks", "mnist", "--corruptions", "fog"]) == 1
    assert main(base + ["--tasks", "mnist,dtd", "--finetuned", str(clip_dir)]) == 1
    assert "--finetuned" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_bfloat16_eval(clip_dir, tmp_path):
    """``--dtype bfloat16`` (float32 accumulation): runs end to end under the default dtype
    promotion and agrees with the float32 run on these 2 x 12 images up to a prediction flip
    per task. Its heads are the float32 ones (the text tower runs once per task, in float32),
    shared through the cache; a head computed in bfloat16 gets its own cache entry."""
    import jax

    from larv_jax.eval.heads import cached_head

    heads = tmp_path / "heads"
    reports = {}
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE), \
            jax.numpy_dtype_promotion("standard"):
        for dt in ("float32", "bfloat16"):
            argv = ["eval", "--clip", str(clip_dir), "--tasks", "pcam,mnist", "--limit", "12",
                    "--batch-size", "8", "--threads", "1", "--dtype", dt, "--heads-cache",
                    str(heads), "--out", str(tmp_path / dt)]
            assert main(argv) == 0
            reports[dt] = json.loads((tmp_path / dt / "eval.json").read_text())
    names = sorted(p.name for p in heads.rglob("*.npz"))
    assert len(names) == 2 and not any("bfloat16" in n for n in names), names
    cfg, params = load_params(clip_dir)
    tok = load_tokenizer(clip_dir, cfg.text.context_length)
    with jax.numpy_dtype_promotion("standard"):
        h16 = cached_head(params, cfg, tok, "t", ["a cat", "a dog"], ["{}."], cache_dir=heads,
                          dtype=jax.numpy.bfloat16)
        h32 = cached_head(params, cfg, tok, "t", ["a cat", "a dog"], ["{}."], cache_dir=heads)
    assert len(list(heads.rglob("t-*-bfloat16.npz"))) == 1 and len(list(heads.rglob("t-*.npz"))) == 2
    assert not np.array_equal(h16, h32)  # two computations, not one served twice
    np.testing.assert_allclose(h16, h32, atol=2e-2)
    for t in ("pcam", "mnist"):
        f32, b16 = (reports[d]["clean"]["tasks"][t] for d in ("float32", "bfloat16"))
        assert b16["n"] == f32["n"] == 12
        assert abs(b16["top1"] - f32["top1"]) <= 1 / 12 + 1e-9, (t, f32, b16)
