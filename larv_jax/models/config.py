"""CLIP architecture configs: presets for ViT-B/32, B/16, L/14 and any Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    image_size: int = 224
    patch_size: int = 32
    channels: int = 3

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
    vocab_size: int = 49408
    context_length: int = 77
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model. ``text is None`` means a vision-only model (``CLIPVisionModel``);
    ``embed_dim is None`` means no projection layers (and no ``logit_scale``)."""

    vision: VisionConfig
    text: TextConfig | None = None
    embed_dim: int | None = None
    logit_scale_init: float = 2.6592
    name: str = "custom"

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def has_projection(self) -> bool:
        return self.embed_dim is not None

    def vision_only(self) -> CLIPConfig:
        """The same vision tower without text and projection (``CLIPVisionModel``)."""
        return dataclasses.replace(self, text=None, embed_dim=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(width: int, layers: int, heads: int) -> TextConfig:
    return TextConfig(width=width, layers=layers, heads=heads, mlp_dim=4 * width)


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": CLIPConfig(
        vision=VisionConfig(width=768, layers=12, heads=12, mlp_dim=3072, patch_size=32),
        text=_text(512, 12, 8), embed_dim=512, name="ViT-B-32"),
    "ViT-B-16": CLIPConfig(
        vision=VisionConfig(width=768, layers=12, heads=12, mlp_dim=3072, patch_size=16),
        text=_text(512, 12, 8), embed_dim=512, name="ViT-B-16"),
    "ViT-L-14": CLIPConfig(
        vision=VisionConfig(width=1024, layers=24, heads=16, mlp_dim=4096, patch_size=14),
        text=_text(768, 12, 12), embed_dim=768, name="ViT-L-14"),
}

# Hugging Face hub ids of the pretrained models (loading needs the files on disk here).
HF_IDS = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
}


def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of ``CLIP(config)``'s Flax parameters, ``{path: shape}`` sorted by path, computed
    from the config alone: no jax import and no abstract ``init`` (a merge that never runs the
    model starts 0.5 s sooner). ``tests/test_models_parity.py`` holds it equal to
    :func:`larv_jax.models.clip.abstract_params` for every preset and its variants."""
    out: dict[str, tuple[int, ...]] = {}

    def tower(prefix: str, cfg: TowerConfig) -> None:
        b, w, m = cfg.layers, cfg.width, cfg.mlp_dim
        blocks = f"{prefix}/transformer/resblocks"
        for name in ("query", "key", "value", "out"):
            out[f"{blocks}/attn/{name}/kernel"] = (b, w, w)
            out[f"{blocks}/attn/{name}/bias"] = (b, w)
        for name in ("ln_1", "ln_2"):
            out[f"{blocks}/{name}/scale"] = out[f"{blocks}/{name}/bias"] = (b, w)
        out[f"{blocks}/mlp/c_fc/kernel"], out[f"{blocks}/mlp/c_fc/bias"] = (b, w, m), (b, m)
        out[f"{blocks}/mlp/c_proj/kernel"], out[f"{blocks}/mlp/c_proj/bias"] = (b, m, w), (b, w)
        if config.embed_dim is not None:
            out[f"{prefix}/proj/kernel"] = (w, config.embed_dim)

    v = config.vision
    tower("visual", v)
    out["visual/class_embedding"] = (v.width,)
    out["visual/conv1/kernel"] = (v.patch_size, v.patch_size, v.channels, v.width)
    out["visual/positional_embedding"] = (v.num_positions, v.width)
    for name in ("ln_pre", "ln_post"):
        out[f"visual/{name}/scale"] = out[f"visual/{name}/bias"] = (v.width,)
    t = config.text
    if t is not None:
        tower("text", t)
        out["text/token_embedding/embedding"] = (t.vocab_size, t.width)
        out["text/positional_embedding"] = (t.context_length, t.width)
        out["text/ln_final/scale"] = out["text/ln_final/bias"] = (t.width,)
        if config.embed_dim is not None:
            out["logit_scale"] = ()
    return dict(sorted(out.items()))


def get_preset(name: str) -> CLIPConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown CLIP preset {name!r}; valid: {sorted(PRESETS)}") from None


_MISSING = object()


def _num(d: dict[str, Any], key: str, where: str, source: str, kind: type = int,
         default: Any = _MISSING, positive: bool = True) -> Any:
    """``d[key]`` as ``kind`` (int: a whole number, not a bool; float: any real number), with an
    error naming the file and the field when it is missing, of another type or not positive."""
    if key not in d:
        if default is _MISSING:
            raise ValueError(f"{source}: {where} lacks key {key!r}")
        return default
    v = d[key]
    ok = (isinstance(v, int) and not isinstance(v, bool)) or (
        kind is float and isinstance(v, float)) or (
        kind is int and isinstance(v, float) and v.is_integer())
    if not ok or (positive and v <= 0):
        what = "a positive " + ("integer" if kind is int else "number") if positive else kind.__name__
        raise ValueError(f"{source}: {where}.{key} must be {what}; got {v!r}")
    return kind(v)


def _section(d: Any, key: str | None, source: str) -> dict[str, Any]:
    sub = d if key is None else d.get(key, {})
    if sub is None:
        sub = {}
    if not isinstance(sub, dict):
        raise ValueError(f"{source}: {key or 'the config'} must be a JSON object; got "
                         f"{type(sub).__name__}")
    return sub


def _check_tower(t: TowerConfig, where: str, source: str) -> None:
    if t.width % t.heads:
        raise ValueError(f"{source}: {where}.hidden_size {t.width} is not divisible by "
                         f"{where}.num_attention_heads {t.heads}")


def _vision_from_hf(d: dict[str, Any], source: str, where: str = "vision_config") -> VisionConfig:
    n = lambda key, **kw: _num(d, key, where, source, **kw)  # noqa: E731
    v = VisionConfig(
        width=n("hidden_size"), layers=n("num_hidden_layers"), heads=n("num_attention_heads"),
        mlp_dim=n("intermediate_size"), act=str(d.get("hidden_act", "quick_gelu")),
        eps=n("layer_norm_eps", kind=float, default=1e-5), image_size=n("image_size"),
        patch_size=n("patch_size"), channels=n("num_channels", default=3))
    _check_tower(v, where, source)
    if v.image_size % v.patch_size:
        raise ValueError(f"{source}: {where}.image_size {v.image_size} is not divisible by "
                         f"{where}.patch_size {v.patch_size}")
    return v


def _text_from_hf(d: dict[str, Any], source: str) -> TextConfig:
    where = "text_config"
    n = lambda key, **kw: _num(d, key, where, source, **kw)  # noqa: E731
    t = TextConfig(
        width=n("hidden_size"), layers=n("num_hidden_layers"), heads=n("num_attention_heads"),
        mlp_dim=n("intermediate_size"), act=str(d.get("hidden_act", "quick_gelu")),
        eps=n("layer_norm_eps", kind=float, default=1e-5), vocab_size=n("vocab_size"),
        context_length=n("max_position_embeddings", default=77),
        eos_token_id=n("eos_token_id", default=49407, positive=False),
        pad_token_id=n("pad_token_id", default=1, positive=False))
    _check_tower(t, where, source)
    return t


def from_hf_dict(d: Any, source: str = "config.json") -> CLIPConfig:
    """Parse a Hugging Face ``CLIPConfig`` or ``CLIPVisionConfig`` dict (``config.json``).

    Every field is checked (type, sign, divisibility of width by heads and of the image by the
    patch): a ValueError names ``source`` and the field."""
    d = _section(d, None, source)
    model_type = d.get("model_type")
    if model_type == "clip":
        vision = _vision_from_hf(_section(d, "vision_config", source), source)
        text = _text_from_hf(_section(d, "text_config", source), source)
        return CLIPConfig(vision=vision, text=text,
                          embed_dim=_num(d, "projection_dim", "config", source, default=512),
                          logit_scale_init=_num(d, "logit_scale_init_value", "config", source,
                                                kind=float, default=2.6592, positive=False),
                          name=guess_name(vision))
    if model_type == "clip_vision_model":
        vision = _vision_from_hf(d, source, where="config")
        # CLIPVisionModelWithProjection carries visual_projection; plain CLIPVisionModel does not.
        with_proj = "CLIPVisionModelWithProjection" in (d.get("architectures") or [])
        return CLIPConfig(vision=vision,
                          embed_dim=_num(d, "projection_dim", "config", source) if with_proj
                          else None, name=guess_name(vision))
    raise ValueError(
        f"{source}: model_type {model_type!r} is not a CLIP model "
        "(expected 'clip' or 'clip_vision_model')")


def read_hf_config(path: str | Path) -> CLIPConfig:
    from larv_jax.io import read_json

    return from_hf_dict(read_json(path, missing="no config.json"), source=str(path))


def to_hf_dict(cfg: CLIPConfig) -> dict[str, Any]:
    """Hugging Face ``config.json`` content (CLIPModel if the config has text, else CLIPVisionModel)."""
    v = cfg.vision
    vision = {
        "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": v.act, "layer_norm_eps": v.eps,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    }
    if cfg.text is None:
        arch = "CLIPVisionModelWithProjection" if cfg.embed_dim else "CLIPVisionModel"
        return {"architectures": [arch], "model_type": "clip_vision_model",
                "torch_dtype": "float32", **vision,
                **({"projection_dim": cfg.embed_dim} if cfg.embed_dim else {})}
    t = cfg.text
    text = {
        "hidden_size": t.width, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "vocab_size": t.vocab_size,
        "max_position_embeddings": t.context_length, "hidden_act": t.act,
        "layer_norm_eps": t.eps, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "bos_token_id": 49406, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }
    return {"architectures": ["CLIPModel"], "model_type": "clip", "torch_dtype": "float32",
            "projection_dim": cfg.embed_dim, "logit_scale_init_value": cfg.logit_scale_init,
            "initializer_factor": 1.0, "vision_config": vision, "text_config": text}


# --- activations --------------------------------------------------------------------------------
# What ``act=`` / ``--act`` accept: exact (erf) GELU, torch's ``nn.GELU()`` (open_clip's default
# configs: ViT-B-32, ViT-B-16, ... with LAION-2B and DataComp weights), and QuickGELU
# ``x * sigmoid(1.702 x)`` (OpenAI CLIP, open_clip's ``*-quickgelu`` configs, every
# ``openai/clip-vit-*`` Hugging Face model).
ACTS = ("gelu", "quick_gelu")


def check_act(act: str, where: str = "act") -> str:
    if act not in ACTS:
        raise ValueError(f"{where} must be one of {list(ACTS)}; got {act!r}")
    return act


def with_act(cfg: CLIPConfig, act: str) -> CLIPConfig:
    """``cfg`` with both towers' activation set to ``act``."""
    check_act(act)
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, act=act),
        text=None if cfg.text is None else dataclasses.replace(cfg.text, act=act))


# --- open_clip (``open_clip_config.json`` of an hf-hub:... repo) -------------------------------
# Options of open_clip's CLIPVisionCfg / CLIPTextCfg that change the computation without
# changing the state dict's keys; larv converts the plain CLIP ViT, so each must keep its default
# (options that add keys, e.g. LayerScale's ``ls_init_value``, are refused by the key check too).
_OC_VISION_DEFAULTS = {
    "ls_init_value": None, "patch_dropout": _MISSING, "attentional_pool": False,
    "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None, "output_tokens": _MISSING,
}
_OC_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "hf_model_name": None, "output_tokens": _MISSING,
}
_OC_MODEL_DEFAULTS = {"custom_text": False, "init_logit_bias": None, "multimodal_cfg": None}


def _oc_plain(d: dict[str, Any], defaults: dict[str, Any], where: str, source: str) -> None:
    for key, default in defaults.items():
        if default is _MISSING or key not in d or d[key] == default:
            continue
        raise ValueError(f"{source}: {where}.{key} = {d[key]!r} is not supported (larv converts "
                         f"plain CLIP ViTs; it must be {default!r} or absent)")


def from_open_clip_dict(d: Any, source: str = "open_clip_config.json") -> CLIPConfig:
    """Parse open_clip's ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg":
    ...}``, or a bare model config such as open_clip's ``model_configs/ViT-B-32.json``).

    Defaults are open_clip's own (``CLIPVisionCfg`` / ``CLIPTextCfg``: head_width 64, mlp_ratio 4,
    patch 16, image 224; text width 512, 8 heads, 12 layers, context 77, vocab 49408). The
    activation follows open_clip's ``CLIP(quick_gelu=False)``: ``model_cfg.quick_gelu`` true is
    QuickGELU, false or absent exact GELU. Every field read is checked; a ValueError names
    ``source`` and the field (``model_cfg.vision_cfg.width``, ...)."""
    d = _section(d, None, source)
    top = "model_cfg" if "model_cfg" in d else "the config"
    m = _section(d, "model_cfg", source) if "model_cfg" in d else d
    where = "model_cfg" if "model_cfg" in d else "config"
    if "vision_cfg" not in m:
        raise ValueError(f"{source}: {top} lacks key 'vision_cfg' (not an open_clip model config)")
    quick = m.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise ValueError(f"{source}: {where}.quick_gelu must be true or false; got {quick!r}")
    act = "quick_gelu" if quick else "gelu"
    _oc_plain(m, _OC_MODEL_DEFAULTS, where, source)
    embed = _num(m, "embed_dim", where, source)

    vw = f"{where}.vision_cfg"
    vd = _section(m, "vision_cfg", source)
    _oc_plain(vd, _OC_VISION_DEFAULTS, vw, source)
    n = lambda key, **kw: _num(vd, key, vw, source, **kw)  # noqa: E731
    image = vd.get("image_size", 224)
    if isinstance(image, list) and len(image) == 2 and image[0] == image[1]:
        image = image[0]
    width = n("width", default=768)
    head_width = n("head_width", default=64)
    if width % head_width:
        raise ValueError(f"{source}: {vw}.width {width} is not divisible by {vw}.head_width "
                         f"{head_width}")
    mlp = width * n("mlp_ratio", kind=float, default=4.0)
    if not mlp.is_integer():
        raise ValueError(f"{source}: {vw}.mlp_ratio gives a fractional MLP width {mlp}")
    vision = VisionConfig(
        width=width, layers=n("layers", default=12), heads=width // head_width,
        mlp_dim=int(mlp), act=act, image_size=_num({"image_size": image}, "image_size", vw, source),
        patch_size=n("patch_size", default=16), channels=3)
    if vision.image_size % vision.patch_size:
        raise ValueError(f"{source}: {vw}.image_size {vision.image_size} is not divisible by "
                         f"{vw}.patch_size {vision.patch_size}")

    tw = f"{where}.text_cfg"
    td = _section(m, "text_cfg", source)
    _oc_plain(td, _OC_TEXT_DEFAULTS, tw, source)
    n = lambda key, **kw: _num(td, key, tw, source, **kw)  # noqa: E731
    twidth = n("width", default=512)
    tmlp = twidth * n("mlp_ratio", kind=float, default=4.0)
    if not tmlp.is_integer():
        raise ValueError(f"{source}: {tw}.mlp_ratio gives a fractional MLP width {tmlp}")
    vocab = n("vocab_size", default=49408)
    # open_clip pools at the highest token id (pool_type 'argmax'): the EOT token, the last id
    text = TextConfig(width=twidth, layers=n("layers", default=12), heads=n("heads", default=8),
                      mlp_dim=int(tmlp), act=act, vocab_size=vocab,
                      context_length=n("context_length", default=77), eos_token_id=vocab - 1)
    if text.width % text.heads:
        raise ValueError(f"{source}: {tw}.width {text.width} is not divisible by {tw}.heads "
                         f"{text.heads}")
    return CLIPConfig(vision=vision, text=text, embed_dim=embed, name=guess_name(vision))


def read_open_clip_config(path: str | Path) -> CLIPConfig:
    from larv_jax.io import read_json

    return from_open_clip_dict(read_json(path, missing="no open_clip_config.json"),
                               source=str(path))


def guess_name(v: VisionConfig) -> str:
    for name, preset in PRESETS.items():
        pv = preset.vision
        if (pv.width, pv.layers, pv.patch_size, pv.image_size) == (
                v.width, v.layers, v.patch_size, v.image_size):
            return name
    return f"ViT-w{v.width}-d{v.layers}-p{v.patch_size}"
