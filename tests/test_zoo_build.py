"""The offline zoo (quick spec): determinism, TFDS round trip, checkpoint round trip, tokenizer,
fine-tuning beats zero-shot, reuse and guards."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from larv_jax.checkpoint import load_params
from larv_jax.models.clip import CLIP
from larv_jax.models.tokenizer import load_tokenizer
from larv_jax.tree import flatten
from larv_jax.zoo import (
    QUICK,
    ZOO_TASKS,
    build_zoo,
    open_zoo,
    train_zoo,
    write_zoo,
    zoo_spec,
)
from larv_jax.zoo import train as ztrain
from larv_jax.zoo.build import split_glyphs, task_arrays


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The quick zoo trained once in memory and written to disk: (state, Zoo)."""
    state = train_zoo(seed=0, spec=QUICK)
    root = tmp_path_factory.mktemp("zoo") / "quick"
    write_zoo(state, root, quick=True)
    return state, open_zoo(root)


def test_build_is_deterministic(zoo, tmp_path):
    """Same seed and spec -> the same bytes in every file (datasets, checkpoints, tokenizer)."""
    _, z = zoo
    manifest = build_zoo(tmp_path / "again", seed=0, quick=True)
    assert manifest["spec_hash"] == z.manifest["spec_hash"]
    assert set(manifest["files"]) == set(z.manifest["files"])
    assert manifest["files"] == z.manifest["files"]
    assert any(p.startswith("data/larv_zoo/") for p in manifest["files"])
    assert "pretrained/tokenizer.json" in manifest["files"]


def test_task_data_depends_on_seed_only():
    glyphs = split_glyphs(0, 64)
    a = task_arrays("digits", seed=0, n_train=32, n_test=16, glyphs=glyphs)
    b = task_arrays("digits", seed=0, n_train=32, n_test=16, glyphs=glyphs)
    c = task_arrays("digits", seed=1, n_train=32, n_test=16, glyphs=split_glyphs(1, 64))
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
    assert not np.array_equal(a["train"][0], c["train"][0])
    # the digits test split renders the held-out glyphs: labels are theirs, in order
    np.testing.assert_array_equal(a["test"][1], glyphs["test"][1][:16])
    assert not set(map(bytes, glyphs["test"][0])) & set(map(bytes, glyphs["train"][0][:200]))


def test_tfds_datasets_read_back_with_labels(zoo):
    """Every written split, read through tfds.data_source, is the generated (image, label)
    multiset (TFDS shuffles the order), with the task's class names."""
    import tensorflow_datasets as tfds

    state, z = zoo
    for name in z.task_names:
        for split in ("train", "test"):
            x, y = state.data[name][split]
            src = tfds.data_source(f"larv_zoo/{name}", split=split, data_dir=str(z.data_dir),
                                   download=False)
            assert len(src) == len(y)
            want = {}
            for img, lab in zip(x, y, strict=True):
                want.setdefault(img.tobytes(), []).append(int(lab))
            for i in range(len(src)):
                ex = src[i]
                img = np.asarray(ex["image"])
                assert img.shape == (32, 32, 3) and img.dtype == np.uint8
                labels = want.get(img.tobytes())
                assert labels is not None, f"{name}/{split}[{i}]: image not among the generated"
                labels.remove(int(ex["label"]))  # ValueError if the label does not match
            assert not any(want.values())
        builder = tfds.builder(f"larv_zoo/{name}", data_dir=str(z.data_dir))
        assert builder.info.features["label"].names == list(ZOO_TASKS[name].classnames)


def test_png_bytes_roundtrip_exact():
    from larv_jax.zoo.tfds_builder import png_bytes

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(img)))), img)


def test_checkpoints_load_back_identical(zoo):
    """load_params gives the in-memory leaves bit for bit, and the same model outputs."""
    state, z = zoo
    cfg, params = load_params(z.pretrained)
    assert cfg.has_text and cfg.embed_dim == state.config.embed_dim
    assert cfg.vision == state.config.vision and cfg.text == state.config.text
    mem, disk = flatten(state.params), flatten(params)
    assert set(mem) == set(disk)
    for p in mem:
        np.testing.assert_array_equal(disk[p], mem[p], err_msg=p)

    x, _ = state.data[z.task_names[0]]["test"]
    images = ztrain.normalize(jnp.asarray(x[:8]))
    ids = jnp.asarray(load_tokenizer(z.pretrained, cfg.text.context_length)(
        ["a red circle", "a striped pattern", "horizontal stripes"]))
    run = lambda c, p: CLIP(c).apply({"params": p}, images, ids)  # noqa: E731
    out_mem, out_disk = run(state.config, state.params), run(cfg, params)
    for k in ("image_embeds", "text_embeds", "logits_per_image"):
        np.testing.assert_array_equal(np.asarray(out_disk[k]), np.asarray(out_mem[k]), err_msg=k)

    for name in z.task_names:
        vcfg, vparams = load_params(z.finetuned[name])
        assert not vcfg.has_text and not vcfg.has_projection
        for p, v in flatten(state.finetuned[name]).items():
            np.testing.assert_array_equal(flatten(vparams)[p], v, err_msg=f"{name}: {p}")
        enc = lambda c, p: CLIP(c.vision_only()).apply(  # noqa: E731
            {"params": p}, images, method=CLIP.encode_image)["pooled"]
        np.testing.assert_array_equal(np.asarray(enc(vcfg, vparams)),
                                      np.asarray(enc(state.config, state.finetuned[name])))


def test_tokenizer_word_level_by_hand(zoo):
    state, z = zoo
    cfg, _ = load_params(z.pretrained)
    tok = load_tokenizer(z.pretrained, cfg.text.context_length)
    vocab = state.tokenizer.get_vocab()
    v = len(vocab)
    assert cfg.text.vocab_size == v and cfg.text.eos_token_id == v - 1
    assert tok.eos_id == v - 1 and tok.bos_id == v - 2 and tok.pad_id == v - 1
    ids = tok(["A Red circle."])[0]
    want = [v - 2, vocab["a"], vocab["red"], vocab["circle"], vocab["."], v - 1]
    np.testing.assert_array_equal(ids[:6], want)
    assert (ids[6:] == v - 1).all()
    # every prompt of every task is in the vocabulary (no [UNK] = 0)
    for task in ZOO_TASKS.values():
        prompts = [t.format(c) for c in task.classnames for t in task.templates]
        assert (tok(prompts) != 0).all(), task.name


def test_finetuning_beats_zero_shot_and_eval_pipeline_agrees(zoo):
    """Stated property: each fine-tune is better on its own task than the pretrained zero-shot
    model. The manifest's in-memory accuracy matches larv_jax.eval.evaluate on the TFDS split
    read from disk with the checkpoints loaded from disk (an independent path)."""
    from larv_jax.eval import evaluate

    _, z = zoo
    cfg, clip_params = load_params(z.pretrained)
    tok = load_tokenizer(z.pretrained, cfg.text.context_length)
    for task in z.eval_tasks():
        rec = z.manifest["tasks"][task.name]
        assert rec["finetuned_top1"] >= rec["zero_shot_top1"] + 0.03, (task.name, rec)
        assert rec["finetune_loss_last"] < rec["finetune_loss_first"]
        _, vparams = load_params(z.finetuned[task.name])
        n = rec["n_test"]
        for params, key in ((vparams, "finetuned_top1"), (clip_params, "zero_shot_top1")):
            res = evaluate(params, clip_params, cfg, [task], str(z.data_dir), tokenizer=tok,
                           batch_size=64)
            r = res["tasks"][task.name]
            assert r["n"] == n
            assert abs(r["top1"] - rec[key]) <= 1.0 / n + 1e-9, (task.name, key, r, rec[key])


def test_larv_eval_scores_the_zoo_tasks_as_the_build_did(zoo, tmp_path, capsys):
    """`larv eval --tasks zoo` (the suite: the quick zoo's 3 tasks) and `zoo/<task>` names score
    the checkpoints on disk to the build's own in-memory accuracies (manifest), with --data-dir
    the zoo itself or its data/, normalized accuracy from --finetuned; the JSON document has them
    under the zoo/ names. The zoo's directory is left as it was."""
    import json

    from larv_jax.cli import main

    _, z = zoo
    before = sorted(str(p.relative_to(z.root)) for p in z.root.rglob("*"))
    names = list(z.task_names)
    rc = main(["eval", "--clip", str(z.pretrained), "--tasks", "zoo", "--data-dir", str(z.root),
               "--finetuned", *[str(z.finetuned[t]) for t in _zoo_order(names)],
               "--out", str(tmp_path / "zs"), "--no-progress", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = doc["results"]["tasks"]
    assert list(got) == ["zoo/" + t for t in _zoo_order(names)]
    for t in names:
        rec = z.manifest["tasks"][t]
        assert abs(got["zoo/" + t] - rec["zero_shot_top1"]) <= 1.0 / rec["n_test"] + 1e-9, t
    norm = doc["results"]["normalized_average"]
    want = np.mean([z.manifest["tasks"][t]["zero_shot_top1"] / z.manifest["tasks"][t]
                    ["finetuned_top1"] for t in names])
    assert abs(norm - want) <= 0.05, (norm, want)  # each ratio within 1/n of the manifest's
    t = names[0]
    rc = main(["eval", "--model", str(z.finetuned[t]), "--clip", str(z.pretrained), "--tasks",
               f"zoo/{t}", "--data-dir", str(z.data_dir), "--out", str(tmp_path / "ft"),
               "--no-progress", "--quiet"])
    assert rc == 0
    rep = json.loads((tmp_path / "ft" / "eval.json").read_text())
    rec = z.manifest["tasks"][t]
    assert rep["tasks"] == [f"zoo/{t}"]
    assert abs(rep["clean"]["tasks"][f"zoo/{t}"]["top1"] - rec["finetuned_top1"]) <= (
        1.0 / rec["n_test"] + 1e-9)
    missing = next(n for n in ZOO_TASKS if n not in names)  # the quick zoo lacks it
    assert main(["eval", "--clip", str(z.pretrained), "--tasks", f"zoo/{missing}",
                 "--data-dir", str(z.root), "--out", str(tmp_path / "no")]) == 1
    assert f"holds no {missing!r}" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert sorted(str(p.relative_to(z.root)) for p in z.root.rglob("*")) == before


def _zoo_order(names):
    return [n for n in ZOO_TASKS if n in names]


def test_reuse_rebuild_and_guards(zoo, tmp_path):
    _, z = zoo
    manifest_file = z.root / "manifest.json"
    before = manifest_file.stat().st_mtime_ns
    again = build_zoo(z.root, seed=0, quick=True)  # same seed and spec: reused, nothing written
    assert again == z.manifest and manifest_file.stat().st_mtime_ns == before
    assert zoo_spec(True, finetune_steps=QUICK.finetune_steps + 1).digest() != QUICK.digest()
    assert zoo_spec(True).digest() == QUICK.digest() != zoo_spec(False).digest()
    with pytest.raises(ValueError, match="unknown zoo spec field"):
        zoo_spec(True, finetune_stepz=3)
    with pytest.raises(ValueError, match="unknown zoo task"):
        zoo_spec(True, tasks=("shapes", "nope"))
    other = tmp_path / "not_a_zoo"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zoo"):
        build_zoo(other, seed=0, quick=True)
    assert (other / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="manifest"):
        open_zoo(other)


def test_multi_positive_clip_loss_by_hand():
    """Duplicate captions share the target mass; with all captions distinct it is CLIP's loss."""
    logits = jnp.asarray([[2.0, 1.0, 0.0], [0.5, 3.0, 0.5], [1.0, 1.0, 1.0]])
    distinct = ztrain.multi_positive_clip_loss(logits, jnp.asarray([0, 1, 2]))
    ls = lambda a: a - np.log(np.exp(a).sum(axis=1, keepdims=True))  # noqa: E731
    lg = np.asarray(logits, np.float64)
    ref = 0.5 * (-np.mean(np.diag(ls(lg))) - np.mean(np.diag(ls(lg.T))))
    np.testing.assert_allclose(float(distinct), ref, rtol=1e-6)
    dup = ztrain.multi_positive_clip_loss(logits, jnp.asarray([0, 0, 2]))
    t = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    ref = 0.5 * (-np.mean((t * ls(lg)).sum(1)) - np.mean((t * ls(lg.T)).sum(1)))
    np.testing.assert_allclose(float(dup), ref, rtol=1e-6)
    assert jax.numpy.isfinite(dup)


def test_quick_zoo_merge_regime(zoo):
    """The regime properties (issue 14) that can hold at the quick size. The quick zoo has 2
    blocks of width 32 pretrained for 40 steps: its zero-shot model is near chance, so "Task
    Arithmetic >= zero-shot + 10 points" cannot hold here (the full zoo is measured by
    benchmarks/zoo_regime.py and the demo). What holds, and is checked against the quick zoo's own
    numbers: fine-tuning gains >= 20 points on average (measured 28.6); Task Arithmetic at lambda
    0.3, merged by hand here, at least 2 points above zero-shot on average (measured +4.7) and at
    or above it on at least 2 of the 3 tasks (measured 3); task vectors nearly orthogonal across
    tasks (|cos| < 0.2; measured <= 0.12), as real CLIP task vectors are."""
    from larv_jax.eval.heads import zero_shot_head
    from larv_jax.models.tokenizer import CLIPTokenizer

    state, _ = zoo
    names = list(state.spec.tasks)
    zs = np.mean([state.results[n]["zero_shot_top1"] for n in names])
    ft = np.mean([state.results[n]["finetuned_top1"] for n in names])
    assert ft - zs >= 0.20, (ft, zs)

    base = flatten(ztrain.vision_tree(state.params))
    taus = {n: {k: np.asarray(v, np.float64) - np.asarray(base[k], np.float64)
                for k, v in flatten(state.finetuned[n]).items()} for n in names}
    keys = sorted(base)
    vec = {n: np.concatenate([taus[n][k].ravel() for k in keys]) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cos = vec[a] @ vec[b] / (np.linalg.norm(vec[a]) * np.linalg.norm(vec[b]))
            assert abs(cos) < 0.2, (a, b, cos)

    from larv_jax.tree import unflatten

    merged = unflatten({k: (np.asarray(base[k], np.float64) + 0.3 * sum(taus[n][k] for n in names)
                            ).astype(np.float32) for k in keys})
    tok = CLIPTokenizer(state.tokenizer, state.spec.context_length)
    proj = state.params["visual"]["proj"]["kernel"]
    ta = {}
    for n in names:
        task = ZOO_TASKS[n]
        head = zero_shot_head(state.params, state.config, tok, task.classnames, task.templates)
        x, y = state.data[n]["test"]
        ta[n] = ztrain.accuracy(merged, config=state.config, proj=proj, head=head, images=x,
                                labels=y)
    assert np.mean(list(ta.values())) >= zs + 0.02, (ta, zs)
    assert sum(ta[n] >= state.results[n]["zero_shot_top1"] for n in names) >= 2, ta


def test_finetune_optimizers_and_spec_checks(zoo):
    """SGD (Nesterov) fine-tuning, tried for the regime, runs and moves the weights; an unknown
    optimizer or domains value is a ValueError naming the valid ones."""
    state, _ = zoo
    name = state.spec.tasks[0]
    x, y = state.data[name]["train"]
    head = np.eye(ZOO_TASKS[name].num_classes, state.config.embed_dim, dtype=np.float32)
    base = ztrain.vision_tree(state.params)
    kw = dict(config=state.config, proj=state.params["visual"]["proj"]["kernel"], head=head,
              images=x[:64], labels=y[:64], steps=3, batch_size=16, lr=0.05, warmup=1,
              weight_decay=0.0, seed=0)
    tuned, losses = ztrain.finetune(base, optimizer="sgd", **kw)
    assert np.all(np.isfinite(losses))
    moved = flatten(tuned)
    assert any(not np.array_equal(moved[k], v) for k, v in flatten(base).items())
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*sgd"):
        ztrain.finetune(base, optimizer="adam", **kw)
    with pytest.raises(ValueError, match="domains must be 'shared' or 'distinct'"):
        zoo_spec(quick=True, domains="mixed")
