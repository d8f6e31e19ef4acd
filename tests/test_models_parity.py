"""Flax CLIP vs transformers' torch CLIP, conversion both ways, orbax round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_hf_clip, make_hf_vision, openai_state_dict, random_inputs

from larv_jax import tree
from larv_jax.checkpoint import load_checkpoint, load_params, restore_params, save_hf, save_params
from larv_jax.models.clip import CLIP, abstract_params

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return path, make_hf_clip(path, seed=1)


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision")
    return path, make_hf_vision(path, seed=2)


def _flax_forward(params, cfg, images, ids=None):
    ids = None if ids is None else jnp.asarray(ids, jnp.int32)
    return CLIP(cfg).apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)), ids)


def test_clipmodel_parity(hf_clip):
    path, model = hf_clip
    cfg, params = load_params(path)
    images, ids = random_inputs()
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(images), input_ids=torch.from_numpy(ids))
        vis_pooled = model.vision_model(pixel_values=torch.from_numpy(images)).pooler_output
        txt_pooled = model.text_model(input_ids=torch.from_numpy(ids)).pooler_output
    out = dict(_flax_forward(params, cfg, images, ids))
    for k in ("image_embeds", "text_embeds"):  # CLIPModel.forward returns normalised embeddings
        out[k] = out[k] / jnp.linalg.norm(out[k], axis=-1, keepdims=True)
    for ours, theirs in [("image_embeds", ref.image_embeds), ("text_embeds", ref.text_embeds),
                         ("logits_per_image", ref.logits_per_image),
                         ("image_pooled", vis_pooled), ("text_pooled", txt_pooled)]:
        np.testing.assert_allclose(np.asarray(out[ours]), theirs.numpy(), atol=1e-4, rtol=0,
                                   err_msg=ours)
    # The comparison is not vacuous: features differ across inputs.
    assert np.abs(np.asarray(out["image_embeds"][0] - out["image_embeds"][1])).max() > 1e-2


def test_legacy_eos_pooling_uses_argmax(tmp_path):
    """OpenAI configs say eos_token_id=2; transformers then pools at the largest id."""
    model = make_hf_clip(tmp_path, seed=3, text_overrides={"eos_token_id": 2})
    cfg, params = load_params(tmp_path)
    assert cfg.text.eos_token_id == 2
    images, ids = random_inputs(seed=4)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(images), input_ids=torch.from_numpy(ids))
    out = _flax_forward(params, cfg, images, ids)
    np.testing.assert_allclose(np.asarray(out["logits_per_image"]), ref.logits_per_image.numpy(),
                               atol=1e-4)


def test_vision_model_parity(hf_vision):
    path, model = hf_vision
    ckpt = load_checkpoint(path)
    assert ckpt.vision_prefix == ""  # transformers 5 saves CLIPVisionModel unprefixed
    cfg, params = load_params(path)
    assert not cfg.has_text and not cfg.has_projection
    images, _ = random_inputs(seed=5)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(images))
    out = _flax_forward(params, cfg, images)
    np.testing.assert_allclose(np.asarray(out["image_pooled"]), ref.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["image_tokens"]), ref.last_hidden_state.numpy(),
                               atol=1e-4)


def test_class_token_only_last_block_matches_torch_and_the_full_forward(hf_clip):
    """``encode_image(tokens=False)`` runs the last block for the class token alone: the same
    pooled output and embeddings as the full forward (and as transformers), no ``tokens``."""
    path, model = hf_clip
    cfg, params = load_params(path)
    images, _ = random_inputs(seed=6)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    enc = lambda tokens: CLIP(cfg).apply({"params": params}, x, tokens,  # noqa: E731
                                         method=CLIP.encode_image)
    full, short = enc(True), enc(False)
    assert set(short) == {"pooled", "embeds"} and "tokens" in full
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(images)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(short["pooled"]), ref, atol=1e-4)
    for k in ("pooled", "embeds"):  # the class token's arithmetic is the same, op for op
        np.testing.assert_allclose(np.asarray(short[k]), np.asarray(full[k]), rtol=1e-6,
                                   atol=1e-6, err_msg=k)
    # not vacuous: the pooled features depend on the image
    assert np.abs(np.asarray(short["pooled"][0] - short["pooled"][1])).max() > 1e-2


def test_stacked_layout(hf_vision):
    path, model = hf_vision
    flat = load_checkpoint(path).flat()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # block 1's q_proj weight [out, in] is the transpose of slice [1] of the stacked Flax kernel
    np.testing.assert_array_equal(flat["visual/transformer/resblocks/attn/query/kernel"][1],
                                  sd["vision_model.encoder.layers.1.self_attn.q_proj.weight"].T
                                  if "vision_model.encoder.layers.1.self_attn.q_proj.weight" in sd
                                  else sd["encoder.layers.1.self_attn.q_proj.weight"].T)
    assert flat["visual/transformer/resblocks/mlp/c_fc/kernel"].shape == (2, 32, 64)
    ckpt = load_checkpoint(path)
    for b in range(2):
        np.testing.assert_array_equal(ckpt.leaf("visual/transformer/resblocks/mlp/c_fc/kernel", b),
                                      flat["visual/transformer/resblocks/mlp/c_fc/kernel"][b])
    with pytest.raises(ValueError, match="out of range"):
        ckpt.leaf("visual/transformer/resblocks/mlp/c_fc/kernel", 2)
    with pytest.raises(ValueError, match="not stacked"):
        ckpt.leaf("visual/ln_pre/scale", 0)
    assert tree.to_matrix("visual/conv1/kernel", flat["visual/conv1/kernel"]).shape == (32, 192)


@pytest.mark.parametrize("fixture", ["hf_clip", "hf_vision"])
def test_hf_roundtrip_bit_exact(fixture, request, tmp_path):
    from safetensors.numpy import load_file

    path, _ = request.getfixturevalue(fixture)
    cfg, params = load_params(path)
    save_hf(params, cfg, tmp_path / "out")
    before = load_file(path / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    strip = lambda k: k if k in before else k.removeprefix("vision_model.")  # noqa: E731
    assert sorted(strip(k) for k in after) == sorted(before)
    for k, v in after.items():
        assert v.dtype == before[strip(k)].dtype and v.shape == before[strip(k)].shape, k
        assert np.array_equal(v, before[strip(k)]), k


def test_exported_hf_loads_in_transformers_with_identical_outputs(hf_clip, tmp_path):
    from transformers import CLIPModel

    path, model = hf_clip
    cfg, params = load_params(path)
    save_hf(params, cfg, tmp_path / "out")
    reloaded = CLIPModel.from_pretrained(tmp_path / "out").eval()
    images, ids = random_inputs(seed=6)
    with torch.no_grad():
        a = model(pixel_values=torch.from_numpy(images), input_ids=torch.from_numpy(ids))
        b = reloaded(pixel_values=torch.from_numpy(images), input_ids=torch.from_numpy(ids))
    assert torch.equal(a.logits_per_image, b.logits_per_image)


def test_openai_state_dict_converts_to_same_tree(hf_clip, tmp_path):
    path, model = hf_clip
    sd = openai_state_dict(model.state_dict())
    torch.save(sd, tmp_path / "openai.pt")
    ckpt = load_checkpoint(tmp_path / "openai.pt", act="quick_gelu")
    assert ckpt.format == "openai" and ckpt.source_dtype == "float16"
    ours = ckpt.flat()
    # the reference: the HF tree rounded through fp16, as the OpenAI archive stores it
    ref = {k: v.astype(np.float16).astype(np.float32) for k, v in load_checkpoint(path).flat().items()}
    assert list(ours) == list(ref)
    for k in ref:
        assert np.array_equal(ours[k], ref[k]), k
    # heads cannot be read off weights (64-wide heads assumed); everything else is inferred
    hf_cfg = load_checkpoint(path).config
    assert dataclasses.replace(ckpt.config.vision, heads=4) == hf_cfg.vision
    assert load_checkpoint(tmp_path / "openai.pt", config=hf_cfg).config == hf_cfg


def test_openai_prefixed_module_state_dict(hf_clip, tmp_path):
    """task_vectors-style ``model.`` prefixes and open_clip's ``attn_mask`` buffer are accepted."""
    path, model = hf_clip
    sd = {"model." + k: v for k, v in openai_state_dict(model.state_dict()).items()}
    sd["model.attn_mask"] = torch.zeros(16, 16)
    torch.save({"state_dict": sd}, tmp_path / "oc.pt")
    assert len(load_checkpoint(tmp_path / "oc.pt", act="quick_gelu").paths()) == len(
        load_checkpoint(path).paths())


def test_orbax_roundtrip(hf_clip, tmp_path):
    path, _ = hf_clip
    cfg, params = load_params(path)
    save_params(params, cfg, tmp_path / "orbax")
    cfg2, restored = restore_params(tmp_path / "orbax")
    assert cfg2.vision == cfg.vision and cfg2.text == cfg.text
    flat, flat2 = tree.flatten(params), tree.flatten(restored)
    assert set(flat) == set(flat2)
    for k in flat:
        assert np.array_equal(np.asarray(flat2[k]), flat[k]), k
    # restore goes into the known abstract tree
    assert jax.tree.structure(restored) == jax.tree.structure(abstract_params(cfg))


def test_cli_convert_roundtrip_loads_in_transformers(hf_vision, tmp_path):
    from transformers import CLIPVisionModel

    from larv_jax.cli import main

    path, model = hf_vision
    assert main(["convert", str(path), "--to", "flax", "--out", str(tmp_path / "flax")]) == 0
    assert main(["convert", str(tmp_path / "flax"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    images, _ = random_inputs(seed=7)
    with torch.no_grad():
        a = model(pixel_values=torch.from_numpy(images)).pooler_output
        b = back(pixel_values=torch.from_numpy(images)).pooler_output
    assert torch.equal(a, b)


def test_inspect_reports_architecture(hf_clip, capsys):
    from larv_jax.cli import main

    path, model = hf_clip
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)["results"]  # the common --json document
    assert info["model"] == "CLIPModel"
    assert info["num_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_param_shapes_from_the_config_match_the_flax_init(preset):
    """The closed-form shapes the checkpoint reader uses (no jax) against the module's own
    abstract init, for the preset, its vision tower, a projected vision tower and a model
    without projections, in the same (sorted) order."""
    from larv_jax.models.config import get_preset, param_shapes

    cfg = get_preset(preset)
    for c in (cfg, cfg.vision_only(), dataclasses.replace(cfg, text=None),
              dataclasses.replace(cfg, embed_dim=None)):
        want = {p: tuple(s.shape) for p, s in tree.flatten(abstract_params(c)).items()}
        got = param_shapes(c)
        assert list(got.items()) == list(want.items())


def test_bfloat16_products_accumulate_in_float32():
    """``dot_general_for(bfloat16)`` / ``matmul(.., bfloat16)``: float32 operands are rounded to
    bf16 and multiplied with float32 accumulation, returning float32. Against numpy in float64
    on the bf16-rounded operands the error is float32 summation error (~1e-6 relative); a
    product accumulated or returned in bf16 would be off by ~2^-9 relative."""
    import ml_dtypes

    from larv_jax.models.clip import dot_general_for, matmul

    assert dot_general_for(jnp.float32) is None
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 768)).astype(np.float32)
    b = rng.standard_normal((768, 96)).astype(np.float32)
    rounded = [x.astype(ml_dtypes.bfloat16).astype(np.float64) for x in (a, b)]
    exact = rounded[0] @ rounded[1]
    dg = dot_general_for(jnp.bfloat16)
    for out in (dg(jnp.asarray(a), jnp.asarray(b), (((1,), (0,)), ((), ()))),
                matmul(jnp.asarray(a), jnp.asarray(b), jnp.bfloat16)):
        assert out.dtype == jnp.float32
        err = np.abs(np.asarray(out, np.float64) - exact).max() / np.abs(exact).max()
        assert err < 1e-5, err
        # and it is the bf16 product, not the float32 one
        assert np.abs(np.asarray(out) - a.astype(np.float64) @ b).max() / np.abs(exact).max() > 1e-4


def test_bfloat16_forward_tracks_torch_float32(hf_clip):
    """The bf16 forward (bf16 product operands, everything else float32) stays within bf16
    resolution of transformers' float32 model: every pooled vector at cosine >= 0.9999 and
    relative error <= 2^-7 (measured 1.7e-3: a few 2^-9 operand roundings per layer, two
    layers)."""
    path, model = hf_clip
    cfg, params = load_params(path)
    images, _ = random_inputs(seed=7)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    out = CLIP(cfg, dtype=jnp.bfloat16).apply({"params": params}, x, False,
                                             method=CLIP.encode_image)["pooled"]
    assert out.dtype == jnp.float32
    got = np.asarray(out, np.float64)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(images)).pooler_output.numpy()
    ref = ref.astype(np.float64)
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999, cos
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 2 ** -7
