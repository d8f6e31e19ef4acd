"""Training loops of the zoo (optax): contrastive CLIP pretraining, frozen-head fine-tuning, and
in-memory top-1.

Images enter as uint8 ``[N, 32, 32, 3]`` and are CLIP-normalised on device (the same mean/std as
:mod:`larv_jax.eval.preprocess`), so what the models are trained on is exactly what the evaluation
pipeline feeds them. Every jitted step is built once per (config, hyperparameters) and cached.
Batches are drawn by a ``np.random.Generator``; parameters start from ``jax.random`` keys; on one
CPU backend the same seed gives the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from larv_jax.eval.preprocess import CLIP_MEAN, CLIP_STD
from larv_jax.models.clip import CLIP
from larv_jax.models.config import CLIPConfig

MAX_LOGIT_SCALE = float(np.log(100.0))


def normalize(images: jax.Array) -> jax.Array:
    """uint8 ``[N, H, W, 3]`` -> float32, ``(x / 255 - mean) / std``."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices (and the patch conv) only, not on biases, LayerNorm, embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), params)


OPTIMIZERS = ("adamw", "sgd")


def _optimizer(lr: float, steps: int, warmup: int, weight_decay: float, name: str = "adamw"):
    """Warmup + cosine schedule, global-norm clipping at 1, then AdamW (b2 0.98) or SGD with
    Nesterov momentum 0.9 and decoupled weight decay (same mask)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                               end_value=0.0)
    if name == "adamw":
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(sched, b2=0.98, weight_decay=weight_decay,
                                       mask=_decay_mask))
    if name == "sgd":
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.add_decayed_weights(weight_decay, mask=_decay_mask),
                           optax.sgd(sched, momentum=0.9, nesterov=True))
    raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")


def multi_positive_clip_loss(logits: jax.Array, caption_ids: jax.Array) -> jax.Array:
    """Symmetric CLIP loss where every pair with the same caption counts as a positive
    (procedural captions repeat inside a batch; plain CLIP would push duplicates apart).

    logits ``[N, N]`` (image x text), caption_ids ``[N]`` int.
    """
    match = (caption_ids[:, None] == caption_ids[None, :]).astype(jnp.float32)
    target = match / jnp.sum(match, axis=1, keepdims=True)
    li = optax.softmax_cross_entropy(logits, target).mean()
    lt = optax.softmax_cross_entropy(logits.T, target).mean()
    return 0.5 * (li + lt)


@functools.cache
def _pretrain_step(config: CLIPConfig, lr: float, steps: int, warmup: int, weight_decay: float):
    model = CLIP(config)
    opt = _optimizer(lr, steps, warmup, weight_decay)

    def loss_fn(params, images, ids, cap):
        out = model.apply({"params": params}, normalize(images), ids)
        return multi_positive_clip_loss(out["logits_per_image"], cap)

    @jax.jit
    def step(params, opt_state, images, ids, cap):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, ids, cap)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)}
        return params, opt_state, loss

    return opt, step


def pretrain(params: Mapping[str, Any], *, config: CLIPConfig, images: np.ndarray,
             ids: np.ndarray, caption_ids: np.ndarray, steps: int, batch_size: int, lr: float,
             warmup: int, weight_decay: float, seed: int, progress: bool = False
             ) -> tuple[dict[str, Any], list[float]]:
    """Contrastive pretraining of a full CLIP on captioned images.

    images uint8 ``[N, 32, 32, 3]``; ids int32 ``[N, T]`` (tokenised captions); caption_ids
    ``[N]`` (equal for equal captions). Returns (params, per-step losses).
    """
    opt, step = _pretrain_step(config, float(lr), int(steps), int(warmup), float(weight_decay))
    params = jax.tree.map(jnp.asarray, dict(params))
    opt_state = opt.init(params)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    order, pos = rng.permutation(len(images)), 0
    bar = _bar(steps, "pretrain", progress)
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = np.sort(order[pos:pos + batch_size])
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, images[idx], ids[idx],
                                       caption_ids[idx].astype(np.int32))
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if len(losses) % 25 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    return jax.tree.map(np.asarray, params), [float(v) for v in losses]


def vision_tree(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"visual": ...}`` without ``visual/proj``: the part a fine-tune moves (CLIPVisionModel)."""
    return {"visual": {k: v for k, v in params["visual"].items() if k != "proj"}}


MAX_CLASSES = 16  # heads are zero-padded to this many rows: one compilation serves every task


def pad_head(head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[C, E]`` -> (``[MAX_CLASSES, E]`` zero-padded, valid ``[MAX_CLASSES]`` bool)."""
    head = np.asarray(head, np.float32)
    c = head.shape[0]
    if c > MAX_CLASSES:
        raise ValueError(f"head has {c} classes > MAX_CLASSES={MAX_CLASSES}")
    out = np.zeros((MAX_CLASSES, head.shape[1]), np.float32)
    out[:c] = head
    return out, np.arange(MAX_CLASSES) < c


@functools.cache
def _logits_fn(config: CLIPConfig):
    model = CLIP(config.vision_only())

    def logits(vparams, proj, head, valid, images):
        pooled = model.apply({"params": vparams}, normalize(images), False,
                             method=CLIP.encode_image)["pooled"]  # class token only
        out = 100.0 * _unit(pooled @ proj) @ head.T
        return jnp.where(valid[None, :], out, -1e9)

    return logits


@functools.cache
def _finetune_step(config: CLIPConfig, lr: float, steps: int, warmup: int, weight_decay: float,
                   optimizer: str = "adamw"):
    logits_fn = _logits_fn(config)
    opt = _optimizer(lr, steps, warmup, weight_decay, optimizer)

    def loss_fn(vparams, proj, head, valid, images, labels):
        logits = logits_fn(vparams, proj, head, valid, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(vparams, opt_state, proj, head, valid, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(vparams, proj, head, valid, images, labels)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, opt_state = opt.update(grads, opt_state, vparams)
        return optax.apply_updates(vparams, updates), opt_state, loss

    return opt, step


def finetune(vision_params: Mapping[str, Any], *, config: CLIPConfig, proj: np.ndarray,
             head: np.ndarray, images: np.ndarray, labels: np.ndarray, steps: int,
             batch_size: int, lr: float, warmup: int, weight_decay: float, seed: int,
             optimizer: str = "adamw", progress: bool = False, desc: str = "finetune"
             ) -> tuple[dict[str, Any], list[float]]:
    """Fine-tune the vision tower only, against a frozen zero-shot head (the CLIP protocol).

    vision_params: ``{"visual": ...}`` without ``proj``; proj ``[D, E]`` (pretrained, frozen);
    head ``[C, E]`` unit rows (pretrained text tower, frozen); logits = 100 cos. Batches may
    wrap around the data. Returns (vision params, per-step losses).
    """
    num_classes = np.shape(head)[0]
    if num_classes <= int(np.max(labels)):
        raise ValueError(f"{desc}: head has {num_classes} classes, labels go up to "
                         f"{int(np.max(labels))}")
    head_p, valid = pad_head(head)
    opt, step = _finetune_step(config, float(lr), int(steps), int(warmup), float(weight_decay),
                               str(optimizer))
    vparams = jax.tree.map(jnp.asarray, dict(vision_params))
    opt_state = opt.init(vparams)
    proj_j, head_j, valid_j = jnp.asarray(proj, jnp.float32), jnp.asarray(head_p), jnp.asarray(valid)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    order, pos = rng.permutation(len(images)), 0
    bar = _bar(steps, desc, progress)
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = np.sort(order[pos:pos + batch_size])
        pos += batch_size
        vparams, opt_state, loss = step(vparams, opt_state, proj_j, head_j, valid_j, images[idx],
                                        labels[idx].astype(np.int32))
        losses.append(loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return jax.tree.map(np.asarray, vparams), [float(v) for v in losses]


@functools.cache
def _predict_fn(config: CLIPConfig):
    logits_fn = _logits_fn(config)
    return jax.jit(lambda v, p, h, m, x: jnp.argmax(logits_fn(v, p, h, m, x), axis=-1
                                                    ).astype(jnp.int32))


def predict(vision_params: Mapping[str, Any], *, config: CLIPConfig, proj: np.ndarray,
            head: np.ndarray, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Zero-shot predictions ``[N]`` int32 (fixed ``[batch_size]`` chunks, last one padded)."""
    fn = _predict_fn(config)
    vparams = jax.tree.map(jnp.asarray, vision_tree(vision_params))
    proj_j = jnp.asarray(proj, jnp.float32)
    head_p, valid = pad_head(head)
    head_j, valid_j = jnp.asarray(head_p), jnp.asarray(valid)
    n = len(images)
    out = np.empty((n,), np.int32)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = np.zeros((batch_size, *images.shape[1:]), np.uint8)
        pad[: len(chunk)] = chunk
        out[start:start + len(chunk)] = np.asarray(fn(vparams, proj_j, head_j, valid_j, pad))[: len(chunk)]
    return out


def accuracy(vision_params: Mapping[str, Any], *, config: CLIPConfig, proj: np.ndarray,
             head: np.ndarray, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of :func:`predict` against ``labels``."""
    preds = predict(vision_params, config=config, proj=proj, head=head, images=images)
    return float(np.mean(preds == np.asarray(labels)))


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)
