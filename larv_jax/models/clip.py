"""CLIP in Flax linen: vision and text towers with stacked (``nn.scan``) encoder blocks.

Parameter names follow scenic's CLIP (OpenAI naming: ``conv1``, ``ln_pre``, ``transformer/resblocks``,
``ln_1``, ``attn``, ``mlp/c_fc``, ``mlp/c_proj``, ``ln_post``, ``proj``), with attention split into
``query``/``key``/``value``/``out`` 2-D Dense layers so that every weight is one matrix. The blocks of
a tower are one stacked subtree with the block axis first (``[B, ...]``). See ``larv_jax/tree.py``
for layouts and ``larv_jax/checkpoint/table.py`` for the mapping to Hugging Face names.

Images are NHWC, already CLIP-normalised. Outputs match ``transformers.CLIPModel``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from larv_jax.models.config import CLIPConfig, TextConfig, TowerConfig, VisionConfig


@functools.cache
def dot_general_for(dtype: Any) -> Callable | None:
    """The ``dot_general`` of a Dense layer whose products run in ``dtype``: ``None`` (Flax's
    default) for float32 and wider; for narrower floats the operands are cast to ``dtype`` and
    the product accumulates in and returns float32.

    Only the matrix products are narrowed (activations, LayerNorm, softmax and the residual stream
    stay float32): more accurate than bf16 end to end, and on XLA:CPU faster too. It runs
    bf16 x bf16 -> f32 on the AMX units (1.6 TFLOP/s measured on this project's VM, against 0.3
    for f32 and for bf16 -> bf16, which takes a generic path), while bf16 elementwise work is
    slower than f32 (quick_gelu over [32, 50, 3072]: 4.6 vs 1.5 ms).
    """
    if jnp.dtype(dtype).itemsize >= 4:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del preferred_element_type  # always float32 accumulation
        return jax.lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers,
                                   precision=precision, preferred_element_type=jnp.float32)

    return dot_general


def matmul(a: jax.Array, b: jax.Array, dtype: Any, precision: Any = None) -> jax.Array:
    """``a @ b`` with operands in ``dtype`` and a float32 result (see :func:`dot_general_for`)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return jnp.matmul(a, b, precision=precision)
    return jnp.matmul(a.astype(dtype), b.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)


ACT = jnp.float32  # activations, LayerNorm, softmax: float32 whatever the products' dtype


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown hidden_act {name!r}; valid: {sorted(ACTIVATIONS)}") from None


class Attention(nn.Module):
    """Multi-head self-attention; with ``first_token_only`` only token 0 queries (output [b, 1, d])."""

    cfg: TowerConfig
    causal: bool
    dtype: Any = jnp.float32
    precision: Any = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.cfg.heads
        tq = 1 if self.first_token_only else t
        dense = lambda name: nn.Dense(d, dtype=ACT, precision=self.precision,  # noqa: E731
                                      dot_general=dot_general_for(self.dtype), name=name)
        # heads-major [b, h, t, d/h] and plain batched matmuls: measured 2.2x faster on XLA:CPU
        # than the equivalent einsums over [b, t, h, d/h] (same numbers)
        heads = lambda y: y.reshape(b, -1, h, d // h).transpose(0, 2, 1, 3)  # noqa: E731
        q = heads(dense("query")(x[:, :tq]))
        k, v = (heads(dense(name)(x)) for name in ("key", "value"))
        logits = matmul(q, k.swapaxes(-1, -2), self.dtype, self.precision) * (d // h) ** -0.5
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))[:tq]
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(ACT), axis=-1)
        y = matmul(probs, v, self.dtype, self.precision).transpose(0, 2, 1, 3).reshape(b, tq, d)
        return dense("out")(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block; with ``first_token_only`` it returns only token 0's output ``[b, 1, d]``
    (the other tokens still serve as keys and values), the same numbers as ``[:, :1]`` of the
    full block for about a sixth of its matrix products (the keys and values of every token)."""

    cfg: TowerConfig
    causal: bool
    dtype: Any = jnp.float32
    precision: Any = None
    first_token_only: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        ln = lambda name: nn.LayerNorm(epsilon=cfg.eps, dtype=ACT, name=name)  # noqa: E731
        attn = Attention(cfg, self.causal, self.dtype, self.precision, self.first_token_only,
                         name="attn")(ln("ln_1")(x))
        x = (x[:, :1] if self.first_token_only else x) + attn
        y = ln("ln_2")(x)
        y = MLP(cfg, self.dtype, self.precision, name="mlp")(y)
        return x + y, None


class MLP(nn.Module):
    cfg: TowerConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dg = dot_general_for(self.dtype)
        x = nn.Dense(self.cfg.mlp_dim, dtype=ACT, precision=self.precision,
                     dot_general=dg, name="c_fc")(x)
        x = activation(self.cfg.act)(x)
        return nn.Dense(self.cfg.width, dtype=ACT, precision=self.precision,
                        dot_general=dg, name="c_proj")(x)


class Transformer(nn.Module):
    """``cfg.layers`` blocks run with ``nn.scan``: params are stacked under ``resblocks``.

    ``first_token_only=True`` returns only token 0 after the last block (``[b, 1, d]``): the
    first ``layers - 1`` blocks run as a scan over the same stacked parameters and the last one
    computes queries, the output projection and the MLP for token 0 alone (what a pooled
    image embedding needs; ~7 % fewer matrix flops for a 12-block tower).
    """

    cfg: TowerConfig
    causal: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first_token_only: bool = False) -> jax.Array:
        cfg = self.cfg
        if first_token_only and not self.is_initializing():
            stacked = self.variables["params"]["resblocks"]
            block = ResidualAttentionBlock(cfg, self.causal, self.dtype, self.precision)
            last = ResidualAttentionBlock(cfg, self.causal, self.dtype, self.precision, True)
            layer = lambda i: jax.tree.map(  # noqa: E731
                lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)

            def body(y, i):  # indexes the stacked leaves in place, as nn.scan does
                return block.apply({"params": layer(i)}, y)[0], None

            x, _ = jax.lax.scan(body, x, jnp.arange(cfg.layers - 1))
            return last.apply({"params": layer(cfg.layers - 1)}, x)[0]
        stack = nn.scan(ResidualAttentionBlock, variable_axes={"params": 0},
                        split_rngs={"params": True}, length=cfg.layers)
        x, _ = stack(cfg, self.causal, self.dtype, self.precision, name="resblocks")(x, None)
        return x[:, :1] if first_token_only else x


class PatchEmbed(nn.Module):
    """The patch convolution (stride = kernel = patch size, no bias) as one matrix product.

    Parameter ``kernel`` ``[P, P, C, D]`` (HWIO, ``nn.Conv``'s layout and init); images
    ``[N, H, W, C]`` -> tokens ``[N, (H/P)(W/P), D]`` in row-major patch order, the same numbers
    as the strided convolution up to summation order, which XLA:CPU ran 1.7x slower (51 vs
    30 ms for 32 images at ViT-B/32).
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, c, d = self.cfg.patch_size, self.cfg.channels, self.cfg.width
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, d))
        n, hh, ww, _ = images.shape
        if hh % p or ww % p:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch "
                             f"size {p}")
        x = images.astype(ACT).reshape(n, hh // p, p, ww // p, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (hh // p) * (ww // p), p * p * c)
        return matmul(x, kernel.reshape(p * p * c, d), self.dtype,
                      self.precision)


class VisionTransformer(nn.Module):
    cfg: VisionConfig
    embed_dim: int | None = None
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, tokens: bool = True) -> dict[str, jax.Array]:
        """images ``[N, H, W, C]`` -> ``{"pooled": [N, D], "embeds": [N, E]?, "tokens": [N, T, D]}``.

        ``tokens=False`` leaves out ``"tokens"`` and runs the last block for the class token only
        (the pooled output and embeddings are the same numbers, ~7 % fewer flops for ViT-B).
        """
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != cfg.channels:
            raise ValueError(f"images must be [N, H, W, {cfg.channels}] (NHWC); got {images.shape}")
        x = PatchEmbed(cfg, self.dtype, self.precision, name="conv1")(images)
        n = x.shape[0]
        init = nn.initializers.normal(cfg.width ** -0.5)
        cls = self.param("class_embedding", init, (cfg.width,))
        pos = self.param("positional_embedding", init, (cfg.num_positions, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(ACT), (n, 1, cfg.width)), x], axis=1)
        if x.shape[1] != cfg.num_positions:
            raise ValueError(f"image size {images.shape[1:3]} gives {x.shape[1]} tokens; the model "
                             f"expects {cfg.num_positions} ({cfg.image_size}px)")
        x = x + pos.astype(ACT)
        x = nn.LayerNorm(epsilon=cfg.eps, dtype=ACT, name="ln_pre")(x)
        x = Transformer(cfg, False, self.dtype, self.precision, name="transformer")(
            x, first_token_only=not tokens)
        pooled = nn.LayerNorm(epsilon=cfg.eps, dtype=ACT, name="ln_post")(x[:, 0])
        out = {"tokens": x, "pooled": pooled} if tokens else {"pooled": pooled}
        if self.embed_dim is not None:
            out["embeds"] = nn.Dense(self.embed_dim, use_bias=False, dtype=ACT,
                                     dot_general=dot_general_for(self.dtype),
                                     precision=self.precision, name="proj")(pooled)
        return out


class TextTransformer(nn.Module):
    cfg: TextConfig
    embed_dim: int | None = None
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        """input_ids ``[N, T]`` (T <= context) -> ``{"pooled": [N, D], "embeds": [N, E]?}``.

        Pools at the first ``eos_token_id`` (the highest id when ``eos_token_id == 2``, the legacy
        OpenAI configs, as transformers does). Padding after EOS cannot reach the pooled token
        through the causal mask, so no padding mask is needed.
        """
        cfg = self.cfg
        t = input_ids.shape[1]
        if t > cfg.context_length:
            raise ValueError(f"text length {t} exceeds context_length {cfg.context_length}")
        x = nn.Embed(cfg.vocab_size, cfg.width, dtype=ACT, name="token_embedding")(input_ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (cfg.context_length, cfg.width))
        x = x + pos[:t].astype(ACT)
        x = Transformer(cfg, True, self.dtype, self.precision, name="transformer")(x)
        x = nn.LayerNorm(epsilon=cfg.eps, dtype=ACT, name="ln_final")(x)
        if cfg.eos_token_id == 2:
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        out = {"pooled": pooled}
        if self.embed_dim is not None:
            out["embeds"] = nn.Dense(self.embed_dim, use_bias=False, dtype=ACT,
                                     dot_general=dot_general_for(self.dtype),
                                     precision=self.precision, name="proj")(pooled)
        return out


class CLIP(nn.Module):
    """CLIP; with ``config.text is None`` a vision tower only (``CLIPVisionModel``).

    ``dtype`` is the operand dtype of the matrix products (``jnp.bfloat16``: bf16 operands,
    float32 accumulation and result); activations, LayerNorm, softmax and the outputs are float32
    either way (:func:`dot_general_for`).
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        cfg = self.config
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, self.dtype, self.precision)
        if cfg.text is not None:
            self.text = TextTransformer(cfg.text, cfg.embed_dim, self.dtype, self.precision)
            if cfg.embed_dim is not None:
                self.logit_scale = self.param(
                    "logit_scale", nn.initializers.constant(cfg.logit_scale_init), ())

    def encode_image(self, images: jax.Array, tokens: bool = True) -> dict[str, jax.Array]:
        """``{"pooled", "embeds"?, "tokens"?}``; ``tokens=False`` skips the per-token outputs
        of the last block (faster; see :class:`VisionTransformer`)."""
        return self.visual(images, tokens)

    def encode_text(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        return self.text(input_ids)

    def __call__(self, images: jax.Array | None = None,
                 input_ids: jax.Array | None = None) -> dict[str, jax.Array]:
        out: dict[str, jax.Array] = {}
        if images is not None:
            out.update({f"image_{k}": v for k, v in self.visual(images).items()})
        if input_ids is not None and self.config.text is not None:
            out.update({f"text_{k}": v for k, v in self.text(input_ids).items()})
        if "image_embeds" in out and "text_embeds" in out:
            img = out["image_embeds"] / jnp.linalg.norm(out["image_embeds"], axis=-1, keepdims=True)
            txt = out["text_embeds"] / jnp.linalg.norm(out["text_embeds"], axis=-1, keepdims=True)
            out["logits_per_image"] = jnp.exp(self.logit_scale) * img @ txt.T
        return out


def init_params(config: CLIPConfig, seed: int = 0) -> dict[str, Any]:
    """Random parameters (the ``"params"`` collection) for ``config``; shapes only matter."""
    v = config.vision
    images = jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32)
    ids = None
    if config.text is not None:
        ids = jnp.zeros((1, config.text.context_length), jnp.int32)
    return CLIP(config).init(jax.random.PRNGKey(seed), images, ids)["params"]


def abstract_params(config: CLIPConfig) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config))
