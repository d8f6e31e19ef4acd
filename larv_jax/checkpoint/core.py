"""Open any supported CLIP checkpoint as Flax-layout leaves, and export Flax params to Hugging Face.

Supported inputs (detected from the file names and keys):

* a Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``) of a ``CLIPModel``,
  ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``, keys with or without ``vision_model.``;
* an open_clip hub directory (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``,
  with ``open_clip_config.json`` when present: its ``model_cfg`` gives the architecture and the
  activation), or one of those files named directly (the config beside it is read);
* a bare ``.safetensors`` file (the config is inferred from the shapes, with 64-wide heads, as in
  every released CLIP);
* an OpenAI / open_clip state dict or OpenAI TorchScript archive (``.pt``/``.bin``; fused
  ``attn.in_proj_weight``; fp16 upcast to float32), including a bare vision tower
  (``model.visual.state_dict()``: ``conv1.weight``, ``transformer.resblocks.*``, ``proj``).

The activation (exact GELU or QuickGELU) shows in no weight: see :func:`load_checkpoint`'s
``act`` for where it is read from, and the warning when nothing says.

Every expected key must be present and every present key used: a missing or unexpected key is a
``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from larv_jax import tree
from larv_jax.arrays import contiguous, copy_into, swapped_buffer
from larv_jax.checkpoint import table
from larv_jax.checkpoint.sources import DictSource, SafetensorsSource, load_torch_file, write_safetensors
from larv_jax.io import atomic_path
from larv_jax.models import config as cfgmod
from larv_jax.models.config import CLIPConfig, TextConfig, VisionConfig


class Checkpoint:
    """A checkpoint opened lazily: ``leaf(path)`` reads and converts one Flax leaf on demand."""

    def __init__(self, source: SafetensorsSource | DictSource, config: CLIPConfig | None,
                 origin: Path):
        self.origin = Path(origin)
        self.source = source
        keys = set(source.keys())
        # a bare open_clip / OpenAI vision tower (``model.visual.state_dict()``): no prefix
        bare_visual = "conv1.weight" in keys and not any(k.startswith("visual.") for k in keys)
        self.format = ("openai" if bare_visual or any(k.startswith("visual.") for k in keys)
                       else "hf")
        if self.format == "hf":
            self.vision_prefix = "vision_model." if any(
                k.startswith("vision_model.") for k in keys) else ""
            has_text = any(k.startswith("text_model.") for k in keys)
            has_proj = "visual_projection.weight" in keys
        else:
            self.vision_prefix = "" if bare_visual else "visual."
            has_text = not bare_visual and "token_embedding.weight" in keys
            has_proj = self.vision_prefix + "proj" in keys
        if bare_visual and config is not None and config.has_text:
            raise ValueError(f"{origin}: a bare vision-tower state dict (keys without 'visual.', "
                             "as model.visual.state_dict() saves them) has no text tower, but "
                             "its config (given, or read beside it) has one: convert the vision "
                             "tower alone (config.vision_only()), or save the whole model's "
                             "state dict")
        if not any(k.startswith(self.vision_prefix + ("embeddings." if self.format == "hf"
                                                      else "conv1")) for k in keys):
            raise ValueError(f"{origin}: no CLIP vision tower found (expected keys like "
                             "'vision_model.embeddings.patch_embedding.weight' or "
                             f"'visual.conv1.weight'; first keys: {sorted(keys)[:5]})")
        if config is None:
            config = self._infer_config(keys, has_text, has_proj)
        self.config = config
        if config.has_text != has_text or (has_proj and not config.has_projection):
            raise ValueError(f"{origin}: config.json (text tower: {config.has_text}, projection: "
                             f"{config.has_projection}) does not match the weights (text tower: "
                             f"{has_text}, projection: {has_proj})")
        if self.format == "hf":
            rows = table.hf_rows(vision_prefix=self.vision_prefix, has_text=has_text,
                                 has_projection=has_proj)
            ignored = table.HF_IGNORED
        else:
            rows = table.openai_rows(has_text=has_text, has_projection=has_proj,
                                     vision_prefix=self.vision_prefix)
            ignored = table.OPENAI_IGNORED
        self._index = self._build_index(rows, keys, ignored)

    # -- public API ---------------------------------------------------------------------------
    def paths(self) -> list[str]:
        return list(self._index)

    def shape(self, path: str) -> tuple[int, ...]:
        return self._expected[path]

    @cached_property
    def source_dtype(self) -> str:
        dtypes = sorted({self.source.dtype(k) for k in self.source.keys()})
        return dtypes[0] if len(dtypes) == 1 else "+".join(dtypes)

    @property
    def files(self) -> list[Path]:
        return self.source.files

    def stores_transposed(self, path: str) -> bool:
        """Whether the source stores this leaf's matrices transposed (HF / OpenAI dense kernels
        are ``[out, in]``, the Flax leaf ``[in, out]``)."""
        return all(t == "T" for _, t in self._index[path])

    def raw_layout(self, path: str) -> tuple[list[tuple[Path, int, int]], bool] | None:
        """The stored float32 bytes of a whole leaf, when ``leaf(path, native=True)`` is exactly
        their concatenation in memory order: ``([(file, byte offset, element count)] in block
        order, swapped)``, ``swapped`` meaning the leaf's memory is its last two axes transposed
        (:func:`larv_jax.arrays.is_swapped`). None when any part needs a conversion (another
        dtype, a reshape, a mixed layout) or the source is not a safetensors file."""
        span = getattr(self.source, "span", None)
        if span is None:
            return None
        parts = self._index[path]
        kinds = {t for _, t in parts}
        shape = self._expected[path]
        inner = shape[1:] if tree.is_stacked(path) else shape
        if kinds == {"T"} and len(inner) == 2:
            swapped, stored = True, tuple(inner[::-1])
        elif kinds == {"id"}:
            swapped, stored = False, tuple(inner)
        else:
            return None
        spans = []
        for key, _ in parts:
            file, offset, shp, dtype = span(key)
            if dtype != np.float32 or tuple(shp) != stored:
                return None
            spans.append((file, offset, int(np.prod(shp, dtype=np.int64))))
        return spans, swapped

    def leaf(self, path: str, block: int | None = None, out: np.ndarray | None = None, *,
             native: bool = False) -> np.ndarray:
        """One Flax leaf as float32 (stacked leaves gathered from their B source tensors).

        ``block`` reads one slice ``[block]`` of a stacked leaf only (for engines that hold K
        copies of one block rather than of the whole stack). ``out``: a float32 array of the
        leaf's shape to read into (returned), instead of a fresh one; any memory order.
        ``native``: when the source stores the leaf transposed (:meth:`stores_transposed`),
        return the Flax-shaped transposed view of a buffer in the source's order (reading is
        then a plain copy; numpy keeps that order through elementwise work and the Hugging Face
        export reads it back without a transpose). Values are the same either way."""
        try:
            parts = self._index[path]
        except KeyError:
            raise KeyError(f"{self.origin}: no parameter {path!r}") from None
        if block is not None:
            if not tree.is_stacked(path):
                raise ValueError(f"{self.origin}: {path!r} is not stacked; block={block} is invalid")
            if not 0 <= block < len(parts):
                raise ValueError(f"{self.origin}: block {block} out of range for {path!r} "
                                 f"({len(parts)} blocks)")
            parts = parts[block:block + 1]
        stacked = tree.is_stacked(path) and block is None
        shape = self._expected[path]
        shape = shape if stacked else shape[1:] if tree.is_stacked(path) else shape
        if out is None:
            out = (swapped_buffer(shape) if native and self.stores_transposed(path)
                   else np.empty(shape, np.float32))
        elif out.shape != tuple(shape) or out.dtype != np.float32:
            raise ValueError(f"leaf({path!r}): out has {out.shape} {out.dtype}; expected "
                             f"{tuple(shape)} float32")
        direct = getattr(self.source, "read_into", None)
        for i, (key, t) in enumerate(parts):
            dest = out[i] if stacked else out
            # float32 tensors whose destination is their own memory layout: read in place
            view = dest if t == "id" else dest.T if t == "T" and dest.ndim == 2 else None
            if direct is not None and view is not None and direct(key, view):
                continue
            self._convert(key, t, dest)
        return out

    def _convert(self, key: str, transform: str, out: np.ndarray) -> None:
        """Read one source tensor and convert it into ``out`` with one float32 copy."""
        x = table.to_flax(np.asarray(self.source.get(key, scratch=True)), transform)
        if x.shape != out.shape:
            raise ValueError(f"{self.origin}: tensor {key!r} converts to shape {x.shape}; "
                             f"expected {out.shape}")
        copy_into(out, x)

    def flat(self, *, native: bool = False) -> dict[str, np.ndarray]:
        """Every leaf (:meth:`leaf`; ``native`` as there)."""
        return {p: self.leaf(p, native=native) for p in self.paths()}

    def params(self) -> dict[str, Any]:
        return tree.unflatten(self.flat())

    # -- construction ---------------------------------------------------------------------------
    @cached_property
    def _expected(self) -> dict[str, tuple[int, ...]]:
        return cfgmod.param_shapes(self.config)

    def _build_index(self, rows, keys: set[str], ignored) -> dict[str, list[tuple[str, str]]]:
        expected = self._expected
        index: dict[str, list[tuple[str, str]]] = {}
        used: set[str] = set()
        for src, path, t in rows:
            if "{i}" in src:
                n = (self.config.vision if path.startswith("visual/") else self.config.text).layers
                names = [src.format(i=i) for i in range(n)]
            else:
                names = [src]
            for name in names:
                if name not in keys:
                    raise ValueError(f"{self.origin}: missing key {name!r} (for {path})")
            index[path] = [(name, t) for name in names]
            used.update(names)
            self._check_shape(path, names[0], t, expected, len(names))
        unexpected = sorted(k for k in keys - used if not k.endswith(ignored))
        if unexpected:
            raise ValueError(f"{self.origin}: unexpected key(s) {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} for a {self.config.name} "
                             "CLIP checkpoint (another architecture, or a LayerScale open_clip model?)")
        missing = sorted(set(expected) - set(index))
        if missing:
            raise ValueError(f"{self.origin}: no source for parameter(s) {missing[:5]}")
        return {p: index[p] for p in expected if p in index}

    def _check_shape(self, path, name, t, expected, n_stack):
        if path not in expected:
            raise ValueError(f"{self.origin}: key {name!r} maps to {path!r}, which a "
                             f"{self.config.name} model does not have")
        shape = self.source.shape(name)
        if t in ("q", "k", "v", "qb", "kb", "vb"):
            shape = (shape[0] // 3, *shape[1:])
        if t in ("T", "q", "k", "v"):
            shape = shape[::-1]
        elif t == "conv":
            shape = (shape[2], shape[3], shape[1], shape[0])
        got = ((n_stack,) if tree.is_stacked(path) else ()) + tuple(shape)
        if got != expected[path]:
            raise ValueError(f"{self.origin}: key {name!r} has shape {self.source.shape(name)}, "
                             f"which gives {got} for {path}; the config expects {expected[path]}")

    def _infer_config(self, keys: set[str], has_text: bool, has_proj: bool) -> CLIPConfig:
        src = self.source

        def layers(prefix: str) -> int:
            pat = re.compile(re.escape(prefix) + r"(\d+)\.")
            ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
            return max(ids) + 1 if ids else 0

        if self.format == "hf":
            vp = self.vision_prefix
            conv = src.shape(vp + "embeddings.patch_embedding.weight")
            pos = src.shape(vp + "embeddings.position_embedding.weight")
            mlp = src.shape(vp + "encoder.layers.0.mlp.fc1.weight")[0]
            n_vis = layers(vp + "encoder.layers.")
        else:
            vp = self.vision_prefix
            conv = src.shape(vp + "conv1.weight")
            pos = src.shape(vp + "positional_embedding")
            mlp = src.shape(vp + "transformer.resblocks.0.mlp.c_fc.weight")[0]
            n_vis = layers(vp + "transformer.resblocks.")
        width, channels, patch = conv[0], conv[1], conv[-1]
        grid = int(round((pos[0] - 1) ** 0.5))
        vision = VisionConfig(width=width, layers=n_vis, heads=max(1, width // 64), mlp_dim=mlp,
                              image_size=grid * patch, patch_size=patch, channels=channels)
        text, embed = None, None
        if has_text:
            if self.format == "hf":
                tok = src.shape("text_model.embeddings.token_embedding.weight")
                ctx = src.shape("text_model.embeddings.position_embedding.weight")[0]
                tmlp = src.shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
                n_txt = layers("text_model.encoder.layers.")
                embed = src.shape("text_projection.weight")[0]
            else:
                tok = src.shape("token_embedding.weight")
                ctx = src.shape("positional_embedding")[0]
                tmlp = src.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
                n_txt = layers("transformer.resblocks.")
                embed = src.shape("text_projection")[1]
            text = TextConfig(width=tok[1], layers=n_txt, heads=max(1, tok[1] // 64), mlp_dim=tmlp,
                              vocab_size=tok[0], context_length=ctx, eos_token_id=tok[0] - 1)
        elif has_proj:
            embed = (src.shape("visual_projection.weight")[0] if self.format == "hf"
                     else src.shape(self.vision_prefix + "proj")[1])
        return CLIPConfig(vision=vision, text=text, embed_dim=embed,
                          name=cfgmod.guess_name(vision))


# Weight files a directory may hold, in the order tried; the open_clip ones are what an
# ``hf-hub:laion/...`` / DataComp repo holds, with ``open_clip_config.json`` beside them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"


class ActivationWarning(UserWarning):
    """A checkpoint's activation was assumed (the file does not say) or overridden by ``act``."""


def _config_for(path: Path, weights: Path) -> tuple[CLIPConfig | None, str | None]:
    """The config file that goes with ``weights`` and what it says: ``(config, where)``; open_clip
    weights take ``open_clip_config.json`` (else ``config.json``), the others ``config.json``."""
    folder = path if path.is_dir() else weights.parent
    if weights.name in OPEN_CLIP_WEIGHTS and (folder / OPEN_CLIP_CONFIG).exists():
        f = folder / OPEN_CLIP_CONFIG
        return cfgmod.read_open_clip_config(f), f"{f} (model_cfg.quick_gelu)"
    if path.is_dir() and (path / "config.json").exists():
        return cfgmod.read_hf_config(path / "config.json"), f"{path / 'config.json'} (hidden_act)"
    return None, None


def _resolve_act(ckpt: Checkpoint, act: str | None, known: str | None) -> None:
    """Set ``ckpt.config``'s activation: ``act`` when given (a warning when it contradicts what
    the file says), else what ``known`` (a description of the file's own word) vouches for, else
    QuickGELU with an :class:`ActivationWarning` naming the file and the assumption."""
    import warnings

    have = ckpt.config.vision.act
    if act is not None:
        if known is not None and have != act:
            warnings.warn(f"{ckpt.origin}: using act={act!r} as given (--act), not {have!r} "
                          f"from {known}", ActivationWarning, stacklevel=3)
        ckpt.config = cfgmod.with_act(ckpt.config, act)
        return
    if known is None:
        warnings.warn(
            f"{ckpt.origin}: the file does not say which activation the model uses; assuming "
            "quick_gelu (OpenAI CLIP, open_clip's *-quickgelu models). open_clip's default "
            "configs (ViT-B-32, ViT-B-16, ...: LAION-2B, DataComp weights) use exact GELU: pass "
            "--act gelu (act='gelu' in Python) for those; --act quick_gelu silences this",
            ActivationWarning, stacklevel=3)
        ckpt.config = cfgmod.with_act(ckpt.config, "quick_gelu")


def _refuse_dangling(path: Path) -> None:
    """A FileNotFoundError naming ``path`` and its target when ``path`` is a symbolic link to
    nothing (e.g. a Hugging Face cache snapshot whose blob was deleted), which ``exists()``
    alone reports as absent: a directory "without weights", a config silently inferred."""
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        where = os.path.normpath(os.path.join(path.parent, target))
        missing = "" if where == target else f": {where}"
        raise FileNotFoundError(f"{path}: dangling symbolic link to {target} (the target does "
                                f"not exist{missing})")


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False,
                    config: CLIPConfig | None = None, act: str | None = None) -> Checkpoint:
    """Open a checkpoint (see module docstring) lazily.

    ``config`` overrides the ``config.json`` / ``open_clip_config.json`` / shape inference (the
    head count cannot be read off the weights: inference assumes 64-wide heads, true for every
    released CLIP).

    ``act`` (``"gelu"``: exact erf GELU, torch's ``nn.GELU()``; ``"quick_gelu"``) is the towers'
    activation, which no weight shows. ``None`` takes it from the file: ``config.json``'s
    ``hidden_act``, ``open_clip_config.json``'s ``model_cfg.quick_gelu`` (absent or false: exact
    GELU, as open_clip reads it), QuickGELU for an OpenAI TorchScript archive or a given
    ``config``; where the file gives no way to know (a bare ``.safetensors``, a ``.pt`` / ``.bin``
    state dict) QuickGELU with an :class:`ActivationWarning` naming the file. An ``act`` that
    contradicts the file's own config wins, with an :class:`ActivationWarning` naming both."""
    path = Path(path)
    _refuse_dangling(path)
    if act is not None:
        cfgmod.check_act(act)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in (*WEIGHT_FILES, "config.json"):
            _refuse_dangling(path / name)
        found = [path / n for n in WEIGHT_FILES if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: directory holds no weights (looked for "
                                    f"{', '.join(WEIGHT_FILES)})")
        weights = found[0]
    else:
        weights = path
    known = "the config given" if config is not None else None
    if config is None:
        config, known = _config_for(path, weights)
    if weights.name.endswith(".index.json"):
        try:
            weight_map = json.loads(weights.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{weights}: not a safetensors index (no 'weight_map')") from None
        files = sorted({weights.parent / f for f in weight_map.values()})
        for f in files:
            _refuse_dangling(f)
            if not f.exists():
                raise FileNotFoundError(f"{weights}: shard {f.name} is missing")
        source = SafetensorsSource(files)
    elif weights.suffix == ".safetensors":
        source = SafetensorsSource([weights])
    elif weights.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        source = load_torch_file(weights, allow_pickle=allow_pickle)
        if known is None and getattr(source, "torchscript", False):
            known = "an OpenAI TorchScript archive (QuickGELU)"
    else:
        raise ValueError(f"{weights}: unknown checkpoint format (expected a directory, "
                         ".safetensors, or .pt/.bin)")
    ckpt = Checkpoint(source, config, path)
    _resolve_act(ckpt, act, known)
    return ckpt


def load_params(path: str | Path, **kw) -> tuple[CLIPConfig, dict[str, Any]]:
    """Read a whole checkpoint: ``(config, params)`` with numpy float32 leaves (keywords as
    :func:`load_checkpoint`'s: ``allow_pickle``, ``config``, ``act``)."""
    ckpt = load_checkpoint(path, **kw)
    return ckpt.config, ckpt.params()


def to_hf_state_dict(params: Mapping[str, Any], config: CLIPConfig, dtype: Any = np.float32
                     ) -> dict[str, np.ndarray]:
    """Flax params (nested or flat) -> Hugging Face state dict (``vision_model.`` prefixed),
    C-contiguous ``dtype`` arrays. An entry may share memory with ``params`` (a leaf already in
    the source order, read with ``native=True``, is exported without a copy): copy before
    modifying it."""
    flat = params if all("/" in k or k == "logit_scale" for k in params) and not any(
        isinstance(v, Mapping) for v in params.values()) else tree.flatten(params)
    rows = table.hf_rows(vision_prefix="vision_model.", has_text=config.has_text,
                         has_projection=config.has_projection)
    out: dict[str, np.ndarray] = {}
    used = set()
    for src, path, t in rows:
        if path not in flat:
            raise ValueError(f"params lack {path!r} needed for a {config.name} Hugging Face export")
        leaf = np.asarray(flat[path])
        used.add(path)
        if "{i}" in src:
            for i in range(leaf.shape[0]):
                out[src.format(i=i)] = contiguous(table.from_flax(leaf[i], t), dtype)
        else:
            out[src] = contiguous(table.from_flax(leaf, t), dtype)
    extra = sorted(set(flat) - used)
    if extra:
        raise ValueError(f"params have leaves with no Hugging Face name: {extra[:5]}")
    return out


def save_hf(params: Mapping[str, Any], config: CLIPConfig, out_dir: str | Path, *,
            overwrite: bool = True, dtype: Any = np.float32,
            extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (transformers loads them) atomically.

    ``params`` may be the full CLIP tree or a vision-only one; the config must agree (use
    ``config.vision_only()`` for a ``CLIPVisionModel``). ``extra_files`` (name -> content) are
    written alongside, e.g. ``tokenizer.json`` or a merge report.
    """
    sd = to_hf_state_dict(params, config, dtype)
    with atomic_path(out_dir, overwrite=overwrite, is_dir=True) as tmp:
        write_safetensors(tmp / "model.safetensors", sd, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfgmod.to_hf_dict(config), indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return Path(out_dir)
