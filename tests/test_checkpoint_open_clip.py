"""open_clip parity: checkpoints that open_clip itself builds (random weights, ``pretrained=None``)
and saves convert to its image and text embeddings, with the activation each file says or is told.

open_clip's default configs (ViT-B-32, ...) use exact GELU (``nn.GELU``), its ``*-quickgelu``
ones QuickGELU; a state dict shows neither. Embeddings are compared unnormalised (``encode_image``
/ ``encode_text`` outputs, entries of order 1), max abs difference <= 1e-4; each test also checks
that the other activation misses by far more, so a wrong act cannot pass.
"""

import contextlib
import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import import_open_clip

from larv_jax.checkpoint import ActivationWarning, load_checkpoint, load_params
from larv_jax.cli import main
from larv_jax.models.clip import CLIP
from larv_jax.models.config import with_act

torch = pytest.importorskip("torch")
open_clip = import_open_clip()
if open_clip is None:
    pytest.skip("open_clip_torch is not installed (make dev installs it)", allow_module_level=True)
from safetensors.torch import save_file  # noqa: E402  (after the skip: torch is there)

TOL = 1e-4
# 64-wide heads (what shape inference assumes): files without a config convert exactly
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 128, "heads": 2,
                     "layers": 2}}
# 32-wide heads and a 2x MLP: only open_clip_config.json can tell
ODD = {"embed_dim": 24,
       "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32,
                      "mlp_ratio": 2.0, "patch_size": 16},
       "text_cfg": {"context_length": 12, "vocab_size": 90, "width": 128, "heads": 4,
                    "layers": 3, "mlp_ratio": 2.0}}
ACT = {False: "gelu", True: "quick_gelu"}
OTHER = {"gelu": "quick_gelu", "quick_gelu": "gelu"}


def _model_cfg(base: dict, quick: bool) -> dict:
    cfg = json.loads(json.dumps(base))
    if quick:  # open_clip's default configs leave the key out; the -quickgelu ones set it
        cfg["quick_gelu"] = True
    return cfg


def _build(folder, model_cfg: dict, seed: int = 0, randomize: bool = True):
    """open_clip builds the model from ``open_clip_config.json`` (its ``local-dir:`` schema, as
    for a hub repo) and its weights are saved beside it as ``open_clip_model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None)
    if randomize:  # every tensor random (LayerNorm 1/0 and zero biases would hide swaps)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if name == "logit_scale":
                    continue
                r = torch.randn(p.shape, generator=g)
                if p.ndim >= 2:
                    p.copy_(r * p[0].numel() ** -0.5)
                elif name.endswith("weight"):  # LayerNorm scales
                    p.copy_(1 + 0.1 * r)
                else:
                    p.copy_(0.1 * r)
    model.eval()
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return model


def _inputs(model_cfg: dict, n: int = 2, seed: int = 0):
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 3, v["image_size"], v["image_size"])).astype(np.float32)
    vocab, ctx = t["vocab_size"], t["context_length"]
    ids = rng.integers(1, vocab - 2, size=(n, ctx)).astype(np.int64)
    ids[:, 0] = vocab - 2                           # start of text
    for row, eot in enumerate([5, ctx - 1][:n]):
        ids[row, eot] = vocab - 1                   # end of text: the largest id, as open_clip's
        ids[row, eot + 1:] = 0                      # tokenizer makes it; padding after it
    return images, ids


def _reference(model, images, ids):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images)).numpy()
        txt = model.encode_text(torch.from_numpy(ids)).numpy() if ids is not None else None
    return img, txt


def _ours(cfg, params, images, ids):
    fwd = jax.jit(lambda p, x, t: CLIP(cfg).apply({"params": p}, x, t))
    out = fwd(params, jnp.asarray(images.transpose(0, 2, 3, 1)),
              None if ids is None else jnp.asarray(ids, jnp.int32))
    txt = np.asarray(out["text_embeds"]) if ids is not None else None
    return np.asarray(out["image_embeds"]), txt


def _diffs(cfg, params, model, images, ids):
    """max |ours - open_clip| for the image and the text embeddings."""
    ref, got = _reference(model, images, ids), _ours(cfg, params, images, ids)
    return [float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True) if a is not None]


def _check_parity(cfg, params, model, images, ids, act):
    ok = _diffs(with_act(cfg, act), params, model, images, ids)
    wrong = _diffs(with_act(cfg, OTHER[act]), params, model, images, ids)
    assert max(ok) <= TOL, (act, ok)
    assert min(wrong) > 10 * TOL, ("the other activation should miss", wrong)
    return ok, wrong


@contextlib.contextmanager
def _no_act_warning():
    """Any ActivationWarning inside is an error (so it is under pytest anyway; this says so where
    it matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ActivationWarning)
        yield


@pytest.mark.parametrize("quick", [False, True], ids=["gelu", "quickgelu"])
def test_pt_state_dict_parity_and_the_warning(quick, tmp_path):
    """A .pt state dict cannot say its activation: a warning names the file and the assumption
    (quick_gelu); act= gives the right one, and open_clip's embeddings to 1e-4."""
    cfg_dict = _model_cfg(TINY, quick)
    model = _build(tmp_path / "oc", cfg_dict, seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.warns(ActivationWarning) as rec:
        ckpt = load_checkpoint(tmp_path / "model.pt")
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert str(tmp_path / "model.pt") in msg and "assuming quick_gelu" in msg and "--act gelu" in msg
    assert ckpt.config.vision.act == ckpt.config.text.act == "quick_gelu"
    act = ACT[quick]
    with _no_act_warning():
        cfg, params = load_params(tmp_path / "model.pt", act=act)  # given: no warning
    assert cfg.vision.act == cfg.text.act == act
    images, ids = _inputs(cfg_dict)
    _check_parity(cfg, params, model, images, ids, act)


@pytest.mark.parametrize("quick", [False, True], ids=["gelu", "quickgelu"])
def test_hub_directory_reads_open_clip_config(quick, tmp_path):
    """open_clip_config.json + open_clip_model.safetensors (an hf-hub:laion/... repo): the
    architecture (32-wide heads, 2x MLPs) and the activation come from model_cfg, no warning."""
    cfg_dict = _model_cfg(ODD, quick)
    model = _build(tmp_path / "hub", cfg_dict, seed=2)
    with _no_act_warning():
        cfg, params = load_params(tmp_path / "hub")
        named = load_checkpoint(tmp_path / "hub" / "open_clip_model.safetensors").config
    assert named == cfg  # the file named directly reads the config beside it
    assert cfg.vision.act == cfg.text.act == ACT[quick]
    assert (cfg.vision.heads, cfg.vision.mlp_dim, cfg.text.heads, cfg.text.mlp_dim) == (4, 256, 4, 256)
    assert (cfg.embed_dim, cfg.vision.patch_size, cfg.text.context_length) == (24, 16, 12)
    images, ids = _inputs(cfg_dict, seed=3)
    _check_parity(cfg, params, model, images, ids, ACT[quick])


def test_directory_with_only_the_safetensors(tmp_path):
    """No open_clip_config.json: shapes give the architecture, the warning the assumption."""
    cfg_dict = _model_cfg(TINY, False)
    model = _build(tmp_path / "hub", cfg_dict, seed=4)
    (tmp_path / "hub" / "open_clip_config.json").unlink()
    assert [p.name for p in (tmp_path / "hub").iterdir()] == ["open_clip_model.safetensors"]
    with pytest.warns(ActivationWarning, match="assuming quick_gelu"):
        load_checkpoint(tmp_path / "hub")
    cfg, params = load_params(tmp_path / "hub", act="gelu")
    images, ids = _inputs(cfg_dict, seed=5)
    _check_parity(cfg, params, model, images, ids, "gelu")


def test_explicit_act_wins_over_the_config_with_a_warning(tmp_path):
    _build(tmp_path / "hub", _model_cfg(TINY, False), seed=6)
    with pytest.warns(ActivationWarning) as rec:
        ckpt = load_checkpoint(tmp_path / "hub", act="quick_gelu")
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "'quick_gelu' as given" in msg and "not 'gelu'" in msg and "open_clip_config.json" in msg
    assert ckpt.config.vision.act == ckpt.config.text.act == "quick_gelu"
    with _no_act_warning():  # agreeing with the file: silent
        assert load_checkpoint(tmp_path / "hub", act="gelu").config.vision.act == "gelu"
    with pytest.raises(ValueError, match="act must be one of"):
        load_checkpoint(tmp_path / "hub", act="relu")


def test_bare_visual_state_dict(tmp_path):
    """model.visual.state_dict() (keys without 'visual.'): the vision tower with its projection;
    asking it for a text tower is an error."""
    cfg_dict = _model_cfg(TINY, False)
    model = _build(tmp_path / "oc", cfg_dict, seed=7)
    torch.save(model.visual.state_dict(), tmp_path / "visual.pt")
    ckpt = load_checkpoint(tmp_path / "visual.pt", act="gelu")
    assert not ckpt.config.has_text and ckpt.config.embed_dim == 32
    assert all(p.startswith("visual/") for p in ckpt.paths())
    images, _ = _inputs(cfg_dict, seed=8)
    ok = _diffs(ckpt.config, ckpt.params(), model, images, None)
    wrong = _diffs(with_act(ckpt.config, "quick_gelu"), ckpt.params(), model, images, None)
    assert ok[0] <= TOL and wrong[0] > 10 * TOL, (ok, wrong)
    full = load_checkpoint(tmp_path / "oc", act="gelu").config
    with pytest.raises(ValueError, match="bare vision-tower state dict.*has no text tower"):
        load_checkpoint(tmp_path / "visual.pt", config=full)


def test_torchscript_archive_is_quick_gelu(tmp_path):
    """OpenAI's released .pt files are TorchScript archives of QuickGELU models: no warning."""
    _build(tmp_path / "oc", _model_cfg(TINY, True), seed=9)
    scripted = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}", pretrained=None, jit=True)
    torch.jit.save(scripted, str(tmp_path / "jit.pt"))
    with _no_act_warning():
        ckpt = load_checkpoint(tmp_path / "jit.pt")
    assert ckpt.config.vision.act == ckpt.config.text.act == "quick_gelu"


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu"])
def test_real_vit_b_32_configs(name, tmp_path):
    """open_clip's own ViT-B-32 configs and init, saved as a hub directory."""
    model_cfg = open_clip.get_model_config(name)
    assert model_cfg.get("quick_gelu", False) == name.endswith("quickgelu")
    model = _build(tmp_path / "hub", model_cfg, randomize=False)
    cfg, params = load_params(tmp_path / "hub")
    assert cfg.name == "ViT-B-32" and cfg.vision.heads == 12 and cfg.text.heads == 8
    images, ids = _inputs(model_cfg, seed=10)
    _check_parity(cfg, params, model, images, ids, ACT["quickgelu" in name])


# -- the CLI -------------------------------------------------------------------------------------

def _cli(argv, capsys):
    """``larv ARGV`` with ActivationWarnings printed as the CLI prints them (not raised)."""
    def show(message, category, filename, lineno, file=None, line=None):  # as Python's own
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():  # (pytest records warnings rather than printing them)
        warnings.simplefilter("always", ActivationWarning)
        warnings.showwarning = show
        rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_warns_exactly_when_the_act_is_unknowable(tmp_path, capsys):
    model = _build(tmp_path / "hub", _model_cfg(TINY, False), seed=11)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cases = [  # (argv, warnings expected, act printed)
        (["inspect", str(tmp_path / "model.pt")], 1, "quick_gelu"),
        (["inspect", str(tmp_path / "model.pt"), "--act", "gelu"], 0, "gelu"),
        (["inspect", str(tmp_path / "hub")], 0, "gelu"),
        (["inspect", str(tmp_path / "hub"), "--act", "quick_gelu"], 1, "quick_gelu"),
    ]
    for argv, n_warn, act in cases:
        rc, out, err = _cli(argv, capsys)
        assert rc == 0, (argv, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("larv: warning:")]
        assert len(lines) == n_warn, (argv, err)
        assert len(err.splitlines()) == n_warn, ("one line per warning", err)
        assert f"act: {act}" in out, (argv, out)


def test_cli_convert_writes_the_act_and_transformers_agrees(tmp_path, capsys):
    """larv convert model.pt --act gelu --to hf: config.json says gelu, and transformers'
    CLIPModel loaded from it gives open_clip's embeddings (an independent forward pass)."""
    from transformers import CLIPModel

    cfg_dict = _model_cfg(TINY, False)
    model = _build(tmp_path / "oc", cfg_dict, seed=12)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rc, _, err = _cli(["convert", str(tmp_path / "model.pt"), "--act", "gelu", "--to", "hf",
                       "--out", str(tmp_path / "hf")], capsys)
    assert rc == 0 and "warning" not in err, err
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["vision_config"]["hidden_act"] == written["text_config"]["hidden_act"] == "gelu"
    with _no_act_warning():
        assert load_checkpoint(tmp_path / "hf").config.vision.act == "gelu"
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, ids = _inputs(cfg_dict, seed=13)
    ref_img, ref_txt = _reference(model, images, ids)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=torch.from_numpy(images))
        txt = hf.get_text_features(input_ids=torch.from_numpy(ids))
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    assert np.abs(img - ref_img).max() <= TOL and np.abs(txt - ref_txt).max() <= TOL


@pytest.mark.parametrize("edit, needles", [
    (lambda d: {**d, "model_cfg": {**d["model_cfg"], "quick_gelu": "yes"}},
     ["model_cfg.quick_gelu", "true or false"]),
    (lambda d: {**d, "model_cfg": {**d["model_cfg"],
                                   "vision_cfg": {**d["model_cfg"]["vision_cfg"], "width": "wide"}}},
     ["model_cfg.vision_cfg.width", "positive integer"]),
    (lambda d: {**d, "model_cfg": {**d["model_cfg"],
                                   "vision_cfg": {**d["model_cfg"]["vision_cfg"],
                                                  "layers": [3, 4, 6, 3]}}},
     ["model_cfg.vision_cfg.layers"]),
    (lambda d: {**d, "model_cfg": {**d["model_cfg"],
                                   "text_cfg": {**d["model_cfg"]["text_cfg"], "pool_type": "last"}}},
     ["model_cfg.text_cfg.pool_type", "not supported"]),
    (lambda d: {"model_cfg": [1, 2]}, ["model_cfg must be a JSON object"]),
    (lambda d: {"model_cfg": {"embed_dim": 8}}, ["lacks key 'vision_cfg'"]),
    (None, ["not valid JSON"]),
])
def test_malformed_open_clip_config_is_one_line_naming_file_and_field(edit, needles, tmp_path,
                                                                      capsys):
    _build(tmp_path / "hub", _model_cfg(TINY, False), seed=14)
    f = tmp_path / "hub" / "open_clip_config.json"
    f.write_text("{not json" if edit is None else json.dumps(edit(json.loads(f.read_text()))))
    rc, _, err = _cli(["inspect", str(tmp_path / "hub")], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    for needle in [str(f), *needles]:
        assert needle in err, (needle, err)


def test_every_command_that_reads_checkpoints_takes_act():
    from larv_jax.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("convert", "inspect", "merge", "diagnose", "eval", "run"):
        act = {a.dest: a for a in sub.choices[name]._actions}.get("act")
        assert act is not None and tuple(act.choices) == ("gelu", "quick_gelu"), name
        default = act.default
        if name == "merge":  # unset until resolved, so that a --config's act can fill it
            import argparse

            from larv_jax.cli import merge

            assert default == argparse.SUPPRESS
            default = merge._DEFAULTS["act"]
        assert default is None, name
