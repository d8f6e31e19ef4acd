"""The one mapping table between checkpoint names and Flax tree paths.

Each row is ``(source name, flax path, transform)``. ``{i}`` in a source name is the encoder block;
rows with ``{i}`` address one slice ``[i]`` of a stacked Flax leaf. Transforms (source -> Flax):

* ``id``    same array;
* ``T``     2-D transpose (torch ``Linear.weight [out, in]`` -> Flax ``kernel [in, out]``);
* ``conv``  ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``;
* ``q``/``k``/``v``  rows ``[0:D]``/``[D:2D]``/``[2D:3D]`` of a fused ``in_proj`` tensor, then ``T``
  for weights (``qb``/``kb``/``vb`` for the fused bias, no transpose).

Hugging Face names are given without the ``vision_model.`` / ``text_model.`` prefixes, which
:func:`hf_rows` adds (transformers 5 saves ``CLIPVisionModel`` without the prefix; both are read).
"""

from __future__ import annotations

import numpy as np

# --- Hugging Face (CLIPModel / CLIPVisionModel) ---------------------------------------------
_HF_BLOCK = [
    ("self_attn.q_proj.weight", "attn/query/kernel", "T"),
    ("self_attn.q_proj.bias", "attn/query/bias", "id"),
    ("self_attn.k_proj.weight", "attn/key/kernel", "T"),
    ("self_attn.k_proj.bias", "attn/key/bias", "id"),
    ("self_attn.v_proj.weight", "attn/value/kernel", "T"),
    ("self_attn.v_proj.bias", "attn/value/bias", "id"),
    ("self_attn.out_proj.weight", "attn/out/kernel", "T"),
    ("self_attn.out_proj.bias", "attn/out/bias", "id"),
    ("layer_norm1.weight", "ln_1/scale", "id"),
    ("layer_norm1.bias", "ln_1/bias", "id"),
    ("mlp.fc1.weight", "mlp/c_fc/kernel", "T"),
    ("mlp.fc1.bias", "mlp/c_fc/bias", "id"),
    ("mlp.fc2.weight", "mlp/c_proj/kernel", "T"),
    ("mlp.fc2.bias", "mlp/c_proj/bias", "id"),
    ("layer_norm2.weight", "ln_2/scale", "id"),
    ("layer_norm2.bias", "ln_2/bias", "id"),
]

HF_VISION = [
    ("embeddings.patch_embedding.weight", "visual/conv1/kernel", "conv"),
    ("embeddings.class_embedding", "visual/class_embedding", "id"),
    ("embeddings.position_embedding.weight", "visual/positional_embedding", "id"),
    ("pre_layrnorm.weight", "visual/ln_pre/scale", "id"),
    ("pre_layrnorm.bias", "visual/ln_pre/bias", "id"),
    *[(f"encoder.layers.{{i}}.{s}", f"visual/transformer/resblocks/{p}", t) for s, p, t in _HF_BLOCK],
    ("post_layernorm.weight", "visual/ln_post/scale", "id"),
    ("post_layernorm.bias", "visual/ln_post/bias", "id"),
]
HF_VISION_PROJ = [("visual_projection.weight", "visual/proj/kernel", "T")]
HF_TEXT = [
    ("embeddings.token_embedding.weight", "text/token_embedding/embedding", "id"),
    ("embeddings.position_embedding.weight", "text/positional_embedding", "id"),
    *[(f"encoder.layers.{{i}}.{s}", f"text/transformer/resblocks/{p}", t) for s, p, t in _HF_BLOCK],
    ("final_layer_norm.weight", "text/ln_final/scale", "id"),
    ("final_layer_norm.bias", "text/ln_final/bias", "id"),
]
HF_TOP = [
    ("text_projection.weight", "text/proj/kernel", "T"),
    ("logit_scale", "logit_scale", "id"),
]
# Buffers some transformers versions save; they carry no parameters.
HF_IGNORED = ("embeddings.position_ids",)


def hf_rows(*, vision_prefix: str, has_text: bool, has_projection: bool) -> list[tuple[str, str, str]]:
    """Rows for a Hugging Face checkpoint whose vision keys start with ``vision_prefix``."""
    rows = [(vision_prefix + s, p, t) for s, p, t in HF_VISION]
    if has_projection:
        rows += HF_VISION_PROJ
    if has_text:
        rows += [("text_model." + s, p, t) for s, p, t in HF_TEXT] + HF_TOP
    return rows


# --- OpenAI CLIP / open_clip (nn.MultiheadAttention: fused q|k|v) ---------------------------------
_OA_BLOCK = [
    ("attn.in_proj_weight", "attn/query/kernel", "q"),
    ("attn.in_proj_weight", "attn/key/kernel", "k"),
    ("attn.in_proj_weight", "attn/value/kernel", "v"),
    ("attn.in_proj_bias", "attn/query/bias", "qb"),
    ("attn.in_proj_bias", "attn/key/bias", "kb"),
    ("attn.in_proj_bias", "attn/value/bias", "vb"),
    ("attn.out_proj.weight", "attn/out/kernel", "T"),
    ("attn.out_proj.bias", "attn/out/bias", "id"),
    ("ln_1.weight", "ln_1/scale", "id"),
    ("ln_1.bias", "ln_1/bias", "id"),
    ("mlp.c_fc.weight", "mlp/c_fc/kernel", "T"),
    ("mlp.c_fc.bias", "mlp/c_fc/bias", "id"),
    ("mlp.c_proj.weight", "mlp/c_proj/kernel", "T"),
    ("mlp.c_proj.bias", "mlp/c_proj/bias", "id"),
    ("ln_2.weight", "ln_2/scale", "id"),
    ("ln_2.bias", "ln_2/bias", "id"),
]
OPENAI_VISION = [
    ("visual.conv1.weight", "visual/conv1/kernel", "conv"),
    ("visual.class_embedding", "visual/class_embedding", "id"),
    ("visual.positional_embedding", "visual/positional_embedding", "id"),
    ("visual.ln_pre.weight", "visual/ln_pre/scale", "id"),
    ("visual.ln_pre.bias", "visual/ln_pre/bias", "id"),
    *[(f"visual.transformer.resblocks.{{i}}.{s}", f"visual/transformer/resblocks/{p}", t)
      for s, p, t in _OA_BLOCK],
    ("visual.ln_post.weight", "visual/ln_post/scale", "id"),
    ("visual.ln_post.bias", "visual/ln_post/bias", "id"),
]
# ``visual.proj`` / ``text_projection`` are used as ``x @ proj``: already Flax [in, out].
OPENAI_VISION_PROJ = [("visual.proj", "visual/proj/kernel", "id")]
OPENAI_TEXT = [
    ("token_embedding.weight", "text/token_embedding/embedding", "id"),
    ("positional_embedding", "text/positional_embedding", "id"),
    *[(f"transformer.resblocks.{{i}}.{s}", f"text/transformer/resblocks/{p}", t)
      for s, p, t in _OA_BLOCK],
    ("ln_final.weight", "text/ln_final/scale", "id"),
    ("ln_final.bias", "text/ln_final/bias", "id"),
    ("text_projection", "text/proj/kernel", "id"),
    ("logit_scale", "logit_scale", "id"),
]
# Metadata and buffers found in OpenAI JIT archives and open_clip state dicts.
OPENAI_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def openai_rows(*, has_text: bool, has_projection: bool, vision_prefix: str = "visual."
                ) -> list[tuple[str, str, str]]:
    """Rows for an OpenAI / open_clip state dict whose vision keys start with ``vision_prefix``
    (``""``: a bare ``model.visual.state_dict()``, which has no text tower)."""
    rows = list(OPENAI_VISION) + (OPENAI_VISION_PROJ if has_projection else [])
    if vision_prefix != "visual.":
        rows = [(vision_prefix + s.removeprefix("visual."), p, t) for s, p, t in rows]
    if has_text:
        rows += OPENAI_TEXT
    return rows


def to_flax(x: np.ndarray, transform: str) -> np.ndarray:
    """Apply a row's transform to one source tensor (one block's slice for stacked rows)."""
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "conv":
        return x.transpose(2, 3, 1, 0)
    if transform in ("q", "k", "v", "qb", "kb", "vb"):
        d = x.shape[0] // 3
        part = x[{"q": 0, "k": 1, "v": 2}[transform[0]] * d:][:d]
        return part.T if transform in ("q", "k", "v") else part
    raise ValueError(f"unknown transform {transform!r}")


def from_flax(x: np.ndarray, transform: str) -> np.ndarray:
    """Inverse of :func:`to_flax` for the non-fused transforms (what HF export needs)."""
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "conv":
        return x.transpose(3, 2, 0, 1)
    raise ValueError(f"transform {transform!r} has no single-tensor inverse")
