"""LARV units (SPEC §1) from flat parameter paths, and per-unit scales expanded to leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larv_jax import diagnostics as dg
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, VisionConfig, get_preset
from larv_jax.tree import flatten

TINY = CLIPConfig(vision=VisionConfig(width=16, layers=2, heads=2, mlp_dim=64, patch_size=4,
                                      image_size=8), name="tiny")


def _shapes(cfg):
    return {p: v.shape for p, v in flatten(abstract_params(cfg)).items()}


def test_tiny_module_units_by_hand():
    us = dg.units(_shapes(TINY))
    assert [u.name for u in us] == ["patch", "attn_0", "mlp_in_0", "mlp_out_0", "attn_1",
                                    "mlp_in_1", "mlp_out_1"]
    assert [u.depth for u in us] == list(range(1, 8))
    rb = "visual/transformer/resblocks/"
    assert us[0].matrices == (("visual/conv1/kernel", None),)
    assert set(us[0].attached) == {("visual/class_embedding", None),
                                   ("visual/positional_embedding", None),
                                   ("visual/ln_pre/scale", None), ("visual/ln_pre/bias", None)}
    assert set(us[4].matrices) == {(f"{rb}attn/{n}/kernel", 1)
                                   for n in ("query", "key", "value", "out")}
    assert set(us[4].attached) == ({(f"{rb}attn/{n}/bias", 1)
                                    for n in ("query", "key", "value", "out")}
                                   | {(f"{rb}ln_1/scale", 1), (f"{rb}ln_1/bias", 1)})
    assert us[2].matrices == ((f"{rb}mlp/c_fc/kernel", 0),)
    assert set(us[2].attached) == {(f"{rb}mlp/c_fc/bias", 0), (f"{rb}ln_2/scale", 0),
                                   (f"{rb}ln_2/bias", 0)}
    # ln_post attaches to the last unit.
    assert set(us[-1].attached) == {(f"{rb}mlp/c_proj/bias", 1), ("visual/ln_post/scale", None),
                                    ("visual/ln_post/bias", None)}


def test_every_visual_leaf_and_block_is_covered_exactly_once():
    shapes = _shapes(get_preset("ViT-B-32"))
    for gran in dg.GRANULARITIES:
        seen = [m for u in dg.units(shapes, gran) for m in u.matrices + u.attached]
        assert len(seen) == len(set(seen))
        expect = {(p, b) for p, s in shapes.items() if p.startswith("visual/")
                  for b in (range(s[0]) if "/resblocks/" in p else (None,))}
        assert set(seen) == expect


def test_vit_b32_unit_counts_and_order():
    cfg = get_preset("ViT-B-32")
    us = dg.units(_shapes(cfg.vision_only()))
    assert len(us) == 37 == 1 + 3 * 12
    assert us[1].name == "attn_0" and us[-1].name == "mlp_out_11"
    with_proj = dg.units(_shapes(cfg))  # CLIPModel: text tower ignored, visual/proj its own unit
    assert len(with_proj) == 38 and with_proj[-1].name == "proj"
    assert ("visual/ln_post/scale", None) in with_proj[-1].attached
    blocks = dg.units(_shapes(cfg), "block")
    assert [u.name for u in blocks] == [f"block_{b}" for b in range(12)]
    assert len(blocks[0].matrices) == 1 + 6 and len(blocks[5].matrices) == 6
    assert ("visual/proj/kernel", None) in blocks[-1].matrices
    assert ("visual/positional_embedding", None) in blocks[0].attached


def test_buckets_for_vit_b32():
    shapes = _shapes(get_preset("ViT-B-32").vision_only())
    plan = dg.plan_buckets(dg.units(shapes), shapes)
    got = {b.shape: len(b.members) for b in plan}
    assert got == {(768, 768): 48, (3072, 768): 25}
    tall = {(r.path, r.transposed) for b in plan for r in b.members if b.shape == (3072, 768)}
    assert ("visual/conv1/kernel", True) in tall  # torch [768, 3*32*32] is wide
    assert ("visual/transformer/resblocks/mlp/c_proj/kernel", True) in tall
    assert ("visual/transformer/resblocks/mlp/c_fc/kernel", False) in tall


def test_bad_inputs_raise():
    shapes = _shapes(TINY)
    with pytest.raises(ValueError, match="granularity"):
        dg.units(shapes, "layer")
    with pytest.raises(ValueError, match="visual/mystery"):
        dg.units({**shapes, "visual/mystery/kernel": (4, 4)})
    with pytest.raises(ValueError, match="vision tower"):
        dg.units({"text/ln_final/scale": (4,)})


def test_unit_scales_to_tree_broadcasts_per_block():
    shapes = _shapes(TINY)
    us = dg.units(shapes)
    s = jnp.arange(1.0, len(us) + 1.0)  # s_l = l
    tree = dg.unit_scales_to_tree(us, s, shapes)
    rb = "visual/transformer/resblocks/"
    assert float(tree["visual/conv1/kernel"]) == 1.0
    assert float(tree["visual/positional_embedding"]) == 1.0
    np.testing.assert_array_equal(np.asarray(tree[f"{rb}attn/query/kernel"]).ravel(), [2.0, 5.0])
    assert tree[f"{rb}attn/query/kernel"].shape == (2, 1, 1)
    np.testing.assert_array_equal(np.asarray(tree[f"{rb}ln_2/bias"]).ravel(), [3.0, 6.0])
    np.testing.assert_array_equal(np.asarray(tree[f"{rb}mlp/c_proj/bias"]).ravel(), [4.0, 7.0])
    assert float(tree["visual/ln_post/scale"]) == 7.0
    assert set(tree) == {p for p in shapes if p.startswith("visual/")}
    # theta0 + s * D broadcasts leaf by leaf.
    rng = np.random.default_rng(0)
    d = rng.standard_normal(shapes[f"{rb}mlp/c_fc/kernel"]).astype(np.float32)
    out = tree[f"{rb}mlp/c_fc/kernel"] * d
    np.testing.assert_allclose(np.asarray(out[1]), 6.0 * d[1])
    # Under jit, with a traced s; and fill for paths outside the units.
    f = jax.jit(lambda s: dg.unit_scales_to_tree(us, s, shapes)[f"{rb}attn/out/bias"])
    np.testing.assert_array_equal(np.asarray(f(2 * s)).ravel(), [4.0, 10.0])
    full = dg.unit_scales_to_tree(us, s, {**shapes, "logit_scale": ()}, fill=1.0)
    assert float(full["logit_scale"]) == 1.0
    with pytest.raises(ValueError, match="expected"):
        dg.unit_scales_to_tree(us, s[:-1], shapes)
