"""Zero-shot classification heads from the pretrained CLIP text tower (SPEC §8), cached on disk.

For class c with templates t_1..t_T: e_ct = proj(pooler(text(t_j(c)))), head_c =
normalize(mean_j normalize(e_ct)). Heads are ``[C, E]`` float32 and are cached per (text-tower
fingerprint, task prompts) as ``<cache_dir>/<fingerprint>/<task>-<prompts hash>.npz``
(``...-bfloat16.npz`` for heads computed in bfloat16).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from larv_jax.io import atomic_path
from larv_jax.models.clip import CLIP
from larv_jax.models.config import CLIPConfig
from larv_jax.tree import flatten

Tokenizer = Callable[[list[str]], np.ndarray]


@functools.cache
def _text_fn(config: CLIPConfig, dtype: Any) -> Callable:
    model = CLIP(config, dtype=dtype)

    @jax.jit
    def embed(params, ids):
        out = model.apply({"params": params}, ids, method=CLIP.encode_text)
        return out["embeds"].astype(jnp.float32)

    return embed


def _text_params(clip_params: Mapping[str, Any]) -> dict[str, Any]:
    if "text" not in clip_params:
        raise ValueError("clip_params has no 'text' subtree: the pretrained CLIP (CLIPModel) is "
                         "needed for zero-shot heads")
    return {"text": clip_params["text"]}


def text_embeddings(clip_params: Mapping[str, Any], config: CLIPConfig, ids: np.ndarray, *,
                    batch_size: int = 256, dtype: Any = jnp.float32) -> np.ndarray:
    """ids ``[N, T]`` int32 -> text embeddings ``[N, E]`` float32 (pooler -> text projection).

    Runs in fixed ``[batch_size, T]`` chunks (last chunk padded) so one compilation serves all.
    """
    if config.text is None or config.embed_dim is None:
        raise ValueError("config has no text tower / projection (need a CLIPModel config)")
    fn = _text_fn(config, dtype)
    # CLIP.setup declares logit_scale with the text tower; it is unused by encode_text.
    params = {**_text_params(clip_params),
              "logit_scale": clip_params.get("logit_scale", np.float32(0.0))}
    ids = np.asarray(ids, np.int32)
    n = ids.shape[0]
    out = np.zeros((n, config.embed_dim), np.float32)
    for start in range(0, n, batch_size):
        chunk = ids[start:start + batch_size]
        pad = np.full((batch_size, ids.shape[1]), chunk[-1], np.int32)  # a valid row as padding
        pad[: len(chunk)] = chunk
        out[start:start + len(chunk)] = np.asarray(fn(params, pad))[: len(chunk)]
    return out


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def zero_shot_head(clip_params: Mapping[str, Any], config: CLIPConfig, tokenizer: Tokenizer,
                   classnames: Sequence[str], templates: Sequence[str], *,
                   batch_size: int = 256, dtype: Any = jnp.float32) -> np.ndarray:
    """Classnames ``[C]`` x templates ``[T]`` -> head ``[C, E]`` (rows unit norm), SPEC §8."""
    if not classnames or not templates:
        raise ValueError("zero_shot_head needs at least one class name and one template")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = text_embeddings(clip_params, config, tokenizer(prompts), batch_size=batch_size,
                          dtype=dtype)
    emb = l2_normalize(emb.reshape(len(classnames), len(templates), -1))
    return l2_normalize(emb.mean(axis=1)).astype(np.float32)


def model_fingerprint(clip_params: Mapping[str, Any]) -> str:
    """sha256 over the text tower's leaves (paths, shapes, float32 bytes), the heads' cache key."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(_text_params(clip_params)).items()):
        arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(path.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:20]


def _prompts_hash(classnames: Sequence[str], templates: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join([*classnames, "\x1e", *templates]).encode()).hexdigest()[:10]


def cached_head(clip_params: Mapping[str, Any], config: CLIPConfig, tokenizer: Tokenizer,
                task_name: str, classnames: Sequence[str], templates: Sequence[str], *,
                cache_dir: str | Path | None, fingerprint: str | None = None,
                batch_size: int = 256, dtype: Any = jnp.float32) -> np.ndarray:
    """``zero_shot_head`` with an on-disk npz cache (atomic writes); ``cache_dir=None``: no cache."""
    if cache_dir is None:
        return zero_shot_head(clip_params, config, tokenizer, classnames, templates,
                              batch_size=batch_size, dtype=dtype)
    fingerprint = fingerprint or model_fingerprint(clip_params)
    # heads computed in another dtype are other numbers: the dtype is part of the key (float32
    # keeps the plain name)
    tag = "" if jnp.dtype(dtype) == jnp.float32 else f"-{jnp.dtype(dtype).name}"
    path = (Path(cache_dir) / fingerprint
            / f"{task_name}-{_prompts_hash(classnames, templates)}{tag}.npz")
    if path.exists():
        with np.load(path) as z:
            head = z["head"]
        if head.shape == (len(classnames), config.embed_dim):
            return head
    head = zero_shot_head(clip_params, config, tokenizer, classnames, templates,
                          batch_size=batch_size, dtype=dtype)
    with atomic_path(path) as tmp:
        np.savez(tmp, head=head, classnames=np.array(classnames), templates=np.array(templates))
    return head
