"""Tiny reference checkpoints written with transformers' torch CLIP (random init, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=99, max_position_embeddings=16, eos_token_id=98, bos_token_id=97,
                 pad_token_id=0)


def _randomize(model, seed: int):
    """transformers' init leaves LayerNorm at 1/0 and biases at 0; perturb every tensor so that
    a transposed or swapped leaf cannot go unnoticed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_hf_vision(path: Path, seed: int = 0, **overrides):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = _randomize(CLIPVisionModel(CLIPVisionConfig(**{**TINY_VISION, **overrides})), seed)
    model.eval().save_pretrained(path)
    return model


def make_hf_clip(path: Path, seed: int = 0, text_overrides=None):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={**TINY_TEXT, **(text_overrides or {})},
                     vision_config=TINY_VISION, projection_dim=16)
    model = _randomize(CLIPModel(cfg), seed)
    model.eval().save_pretrained(path)
    return model


def random_inputs(seed: int = 0, n: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(3, 97, size=(n, 16)).astype(np.int64)
    for row, eos_at in enumerate([5, 15, 9][:n]):
        ids[row, eos_at] = 98       # EOS (also the largest id: both pooling rules agree)
        ids[row, eos_at + 1:] = 0   # padding after EOS
    ids[:, 0] = 97
    return images, ids


def openai_state_dict(hf_sd: dict) -> dict:
    """An OpenAI / open_clip state dict built from a Hugging Face CLIPModel one (q|k|v fused,
    projections stored as ``x @ proj``)."""
    import torch

    out = {}
    towers = [("vision_model.", "visual.", "encoder.layers."),
              ("text_model.", "", "encoder.layers.")]
    for hf_pre, oa_pre, _ in towers:
        n = 1 + max(int(k.split(".")[3]) for k in hf_sd if k.startswith(hf_pre + "encoder.layers."))
        for i in range(n):
            b = f"{hf_pre}encoder.layers.{i}."
            o = f"{oa_pre}transformer.resblocks.{i}."
            out[o + "attn.in_proj_weight"] = torch.cat(
                [hf_sd[b + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[o + "attn.in_proj_bias"] = torch.cat(
                [hf_sd[b + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            for hf, oa in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                           ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                           ("mlp.fc2", "mlp.c_proj")]:
                for wb in ("weight", "bias"):
                    out[o + f"{oa}.{wb}"] = hf_sd[b + f"{hf}.{wb}"]
    v = "vision_model."
    out["visual.conv1.weight"] = hf_sd[v + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf_sd[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf_sd[v + "embeddings.position_embedding.weight"]
    for hf, oa in [("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]:
        for wb in ("weight", "bias"):
            out[f"visual.{oa}.{wb}"] = hf_sd[f"{v}{hf}.{wb}"]
    out["visual.proj"] = hf_sd["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = hf_sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf_sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = hf_sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = hf_sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = hf_sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = hf_sd["logit_scale"]
    return {k: v.half() for k, v in out.items()}  # OpenAI archives are fp16


def larv_reference(base, tau, merge, *, gate, apply="post", svc=None, svc_order="svc_first",
                   **plan_kwargs):
    """The LARV pipeline written out with the library's three steps (merge -> plan -> apply), as
    every caller runs it: ``(params_flat, plan)``. ``merge(tau) -> delta``; ``svc(delta, tau)``
    before the plan unless ``svc_order="larv_first"``."""
    from larv_jax.larv.plan import apply as apply_plan
    from larv_jax.larv.plan import plan

    delta = merge(tau)
    if svc is not None and svc_order == "svc_first":
        delta = svc(delta, tau)
    p = plan(base, delta, gate=gate, **plan_kwargs)
    return apply_plan(base, delta, p, mode=apply, merge=merge, tau=tau, svc=svc,
                      svc_order=svc_order), p


def import_open_clip():
    """``open_clip`` (open_clip_torch, the reference for the open_clip parity tests), or None
    when it is not installed.

    open_clip imports torchvision at module level (``utils.py``: ``FrozenBatchNorm2d``, for
    ResNets; ``transform.py``: the image transforms), and PyPI's torchvision wheels are CUDA
    builds that fail to load with the CPU torch. Neither is on the ViT path the tests run
    (``create_model``, ``encode_image``, ``encode_text``), so where torchvision does not import,
    placeholder modules stand in for it while open_clip is imported, and are removed from
    ``sys.modules`` afterwards (nothing else sees them). transformers' torchvision check is run
    first, so its cached answer is the real one."""
    import importlib.machinery
    import sys
    import types

    try:
        import open_clip

        return open_clip
    except ImportError as e:
        if "open_clip" in str(e):
            return None
        if "torchvision" not in str(e):
            raise
    except RuntimeError:  # a torchvision that is installed but cannot load its operators
        pass
    for name in [m for m in sys.modules if m.split(".")[0] in ("open_clip", "torchvision")]:
        del sys.modules[name]
    import transformers.utils

    transformers.utils.is_torchvision_available()

    class Placeholder(type):
        def __getattr__(cls, name):  # e.g. InterpolationMode.BICUBIC in default arguments
            return cls

    def stub(name):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        made: dict[str, type] = {}

        def attr(key):
            if key.startswith("__"):
                raise AttributeError(key)
            return made.setdefault(key, Placeholder(key, (), {}))

        mod.__getattr__ = attr
        return mod

    names = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional"]
    stubs = {n: stub(n) for n in names}
    for n in names[1:]:
        parent, _, child = n.rpartition(".")
        setattr(stubs[parent], child, stubs[n])
    sys.modules.update(stubs)
    try:
        import open_clip
    finally:
        for n in names:
            sys.modules.pop(n, None)
    return open_clip
