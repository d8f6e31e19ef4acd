"""End-to-end evaluation on a tiny local TFDS builder with a tiny random CLIP, against numpy.

The builder writes a few dozen PNGs with known labels to a tmp data_dir as array_record and the
evaluation reads them back through ``tfds.data_source`` (the users' path). The expected accuracy
comes from a numpy CLIP forward written independently of the Flax model, with the images
preprocessed by transformers' ``CLIPImageProcessorPil``: half the labels are set to the numpy
prediction and half to another class, so the expected top-1 is known exactly.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from larv_jax.eval import heads as heads_lib
from larv_jax.eval import zero_shot as ev
from larv_jax.eval.data import open_source
from larv_jax.eval.tasks import Task
from larv_jax.models.clip import init_params
from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig

SIZE = 32
CFG = CLIPConfig(
    vision=VisionConfig(width=32, layers=2, heads=4, mlp_dim=64, image_size=SIZE, patch_size=8),
    text=TextConfig(width=32, layers=2, heads=4, mlp_dim=64, vocab_size=64, context_length=12,
                    eos_token_id=63, pad_token_id=0),
    embed_dim=16, name="tiny")
N_IMAGES = 37
NUM_CLASSES = 5
CLASSNAMES = ("red", "green", "blue", "dark", "light")
TEMPLATES = ("a photo of {}.", "{} thing", "the {} one!")


def fake_tokenizer(texts):
    """Deterministic toy tokenizer: BOS=62, characters -> 1..60, EOS=63, padding 0."""
    out = np.zeros((len(texts), CFG.text.context_length), np.int32)
    for i, t in enumerate(texts):
        ids = [62] + [ord(ch) % 60 + 1 for ch in t][: CFG.text.context_length - 2] + [63]
        out[i, : len(ids)] = ids
    return out


# ------------------------------------------------------------------ numpy reference CLIP
def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _block(x, p, i, heads, causal):
    g = lambda tree: {k: (g(v) if isinstance(v, dict) else np.asarray(v, np.float64)[i])  # noqa: E731
                      for k, v in tree.items()}
    p = g(p)
    t, d = x.shape
    hd = d // heads
    h = _ln(x, p["ln_1"])
    attn = p["attn"]
    out = np.zeros_like(x)
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        q = h @ attn["query"]["kernel"][:, sl] + attn["query"]["bias"][sl]
        k = h @ attn["key"]["kernel"][:, sl] + attn["key"]["bias"][sl]
        v = h @ attn["value"]["kernel"][:, sl] + attn["value"]["bias"][sl]
        s = q @ k.T / np.sqrt(hd)
        if causal:
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, sl] = w @ v
    x = x + out @ attn["out"]["kernel"] + attn["out"]["bias"]
    h = _ln(x, p["ln_2"])
    h = h @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"]
    h = h / (1 + np.exp(-1.702 * h))
    return x + h @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]


def np_image_embed(params, image):
    """image [S, S, 3] (CLIP-normalised) -> unit embedding [E]."""
    v = params["visual"]
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ps = CFG.vision.patch_size
    k = f(v["conv1"]["kernel"])  # [P, P, 3, D]
    patches = [image[r:r + ps, c:c + ps].reshape(-1) @ k.reshape(-1, k.shape[-1])
               for r in range(0, SIZE, ps) for c in range(0, SIZE, ps)]
    x = np.concatenate([f(v["class_embedding"])[None], np.stack(patches)]) + f(
        v["positional_embedding"])
    x = _ln(x, {k2: f(a) for k2, a in v["ln_pre"].items()})
    for i in range(CFG.vision.layers):
        x = _block(x, v["transformer"]["resblocks"], i, CFG.vision.heads, causal=False)
    pooled = _ln(x[0], {k2: f(a) for k2, a in v["ln_post"].items()})
    e = pooled @ f(v["proj"]["kernel"])
    return e / np.linalg.norm(e)


def np_text_embed(params, ids):
    t = params["text"]
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(t["token_embedding"]["embedding"])[ids] + f(t["positional_embedding"])[: len(ids)]
    for i in range(CFG.text.layers):
        x = _block(x, t["transformer"]["resblocks"], i, CFG.text.heads, causal=True)
    x = _ln(x, {k: f(a) for k, a in t["ln_final"].items()})
    eos = int(np.nonzero(ids == CFG.text.eos_token_id)[0][0])
    return x[eos] @ f(t["proj"]["kernel"])


def np_head(params, classnames, templates):
    rows = []
    for c in classnames:
        embs = []
        for tpl in templates:
            e = np_text_embed(params, fake_tokenizer([tpl.format(c)])[0])
            embs.append(e / np.linalg.norm(e))
        m = np.mean(embs, axis=0)
        rows.append(m / np.linalg.norm(m))
    return np.stack(rows)


# ------------------------------------------------------------------ tiny local builder
class LarvTestShapes(tfds.core.GeneratorBasedBuilder):
    """Test-only builder: PNGs + labels.json from the manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "PNGs + labels.json written by the test fixture."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(dl_manager.manual_dir)}

    def _generate_examples(self, root):
        labels = json.loads((root / "labels.json").read_text())
        for name, label in sorted(labels.items()):
            yield name, {"image": (root / name).read_bytes(), "label": label,
                         "index": int(name[3:6])}


def _random_images(rng):
    shapes = [(40, 48), (32, 32), (20, 30), (50, 36)]
    return [(rng.random((*shapes[i % 4], 3)) * 255).astype(np.uint8) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = pil.CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                     crop_size={"height": SIZE, "width": SIZE})
    params = init_params(CFG, seed=0)
    rng = np.random.default_rng(0)
    images = _random_images(rng)
    head = np_head(params, CLASSNAMES, TEMPLATES)
    preds = []
    for img in images:
        x = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        preds.append(int(np.argmax(head @ np_image_embed(params, x.astype(np.float64)))))
    preds = np.array(preds)
    n_right = 20
    labels = preds.copy()
    labels[n_right:] = (preds[n_right:] + 1) % NUM_CLASSES
    manual = tmp_path_factory.mktemp("manual")
    names = {}
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        (manual / f"img{i:03d}.png").write_bytes(buf.getvalue())
        names[f"img{i:03d}.png"] = int(lab)
    (manual / "labels.json").write_text(json.dumps(names))
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = LarvTestShapes(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    task = Task("shapes", "larv_test_shapes", "test", CLASSNAMES, TEMPLATES)
    return {"params": params, "data_dir": str(data_dir), "task": task, "head": head,
            "expected": n_right / N_IMAGES, "preds": preds, "labels": labels}


def test_heads_match_numpy(setup):
    head = heads_lib.zero_shot_head(setup["params"], CFG, fake_tokenizer, CLASSNAMES, TEMPLATES,
                                    batch_size=8)
    assert head.shape == (NUM_CLASSES, CFG.embed_dim)
    np.testing.assert_allclose(head, setup["head"], atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(head, axis=1), 1.0, atol=1e-6)


def test_accuracy_matches_numpy_through_tfds(setup):
    src = open_source(setup["task"], setup["data_dir"])
    assert len(src) == N_IMAGES
    res = ev.evaluate(setup["params"], setup["params"], CFG, [setup["task"]], setup["data_dir"],
                      tokenizer=fake_tokenizer, batch_size=8, num_threads=2)
    r = res["tasks"]["shapes"]
    assert r["n"] == N_IMAGES
    assert r["correct"] == round(setup["expected"] * N_IMAGES)
    assert res["average"] == pytest.approx(setup["expected"])


def test_limit_and_label_map(setup):
    # label_map swapping classes 0 <-> 1 and dropping class 4: count what numpy says it should.
    lm = (1, 0, 2, 3, -1)
    task = Task("shapes_mapped", "larv_test_shapes", "test", CLASSNAMES, TEMPLATES, label_map=lm)
    limit = 30
    res = ev.evaluate(setup["params"], setup["params"], CFG, [task], setup["data_dir"],
                      heads={"shapes_mapped": setup["head"]}, batch_size=8, limit=limit,
                      num_threads=1)
    src = open_source(task, setup["data_dir"])  # TFDS shuffles by key hash: read its order
    order = np.array([int(src[i]["index"]) for i in range(limit)])
    mapped = np.array([lm[x] for x in setup["labels"][order]])
    keep = mapped >= 0
    r = res["tasks"]["shapes_mapped"]
    assert r["n"] == int(keep.sum())
    assert r["correct"] == int((setup["preds"][order][keep] == mapped[keep]).sum())


def test_one_compilation_across_tasks(setup):
    """Tasks with 5 and 3 classes and two models share one trace per batch shape."""
    task3 = Task("shapes3", "larv_test_shapes", "test", CLASSNAMES[:3], TEMPLATES,
                 label_map=(0, 1, 2, -1, -1))
    heads = {"shapes": setup["head"], "shapes3": setup["head"][:3]}
    before = ev.trace_count(CFG)
    other = init_params(CFG, seed=1)
    for params in (setup["params"], other):
        ev.evaluate(params, setup["params"], CFG, [setup["task"], task3], setup["data_dir"],
                    heads=heads, batch_size=4, limit=9, num_threads=1)
    assert ev.trace_count(CFG) - before == 1
    ev.evaluate(setup["params"], setup["params"], CFG, [task3], setup["data_dir"], heads=heads,
                batch_size=6, limit=9, num_threads=1)
    assert ev.trace_count(CFG) - before == 2


def test_head_cache(setup, tmp_path, monkeypatch):
    params = setup["params"]
    fp = heads_lib.model_fingerprint(params)
    h1 = heads_lib.cached_head(params, CFG, fake_tokenizer, "shapes", CLASSNAMES, TEMPLATES,
                               cache_dir=tmp_path, batch_size=8)
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 1 and files[0].parent.name == fp

    def boom(*a, **k):
        raise AssertionError("head recomputed despite the cache")

    monkeypatch.setattr(heads_lib, "zero_shot_head", boom)
    h2 = heads_lib.cached_head(params, CFG, fake_tokenizer, "shapes", CLASSNAMES, TEMPLATES,
                               cache_dir=tmp_path)
    np.testing.assert_array_equal(h1, h2)
    # Another text tower -> another fingerprint; other vision weights -> the same one.
    other = init_params(CFG, seed=3)
    assert heads_lib.model_fingerprint(other) != fp
    assert heads_lib.model_fingerprint({**other, "text": params["text"]}) == fp


def test_normalized_accuracy_and_unseen():
    na = ev.normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9, "c": 0.3})
    assert na["tasks"] == {"a": 0.5, "b": 1.0}
    assert na["average"] == pytest.approx(0.75)
    accs = {"sun397": 0.6, "stanford_cars": 0.6, "resisc45": 0.6, "dtd": 0.6, "svhn": 0.6,
            "gtsrb": 0.6, "mnist": 0.2, "eurosat": 0.4}
    assert ev.seen_unseen_average(accs) == pytest.approx({"seen": 0.6, "unseen": 0.3})


def test_missing_data_names_dataset(tmp_path):
    task = Task("shapes", "larv_test_shapes", "test", CLASSNAMES, TEMPLATES)
    with pytest.raises(FileNotFoundError, match="larv_test_shapes"):
        open_source(task, str(tmp_path))
