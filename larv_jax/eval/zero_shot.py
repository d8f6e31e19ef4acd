"""Zero-shot top-1 evaluation of a (merged) CLIP vision tower on the task registry (SPEC §8).

Image side: vision tower pooled output (post-LayerNorm CLS) -> the PRETRAINED visual projection
-> L2-normalise; logits = 100 * cos with the task's zero-shot head. One jitted scoring function
per (vision architecture, dtype, batch shape): heads are zero-padded to ``max_classes`` rows and
the padded classes masked to -inf, so the number of classes never enters the jit signature, and
the vision parameters are arguments (not constants), so every model reuses the same compilation.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from larv_jax.eval import data as data_lib
from larv_jax.eval.heads import Tokenizer, cached_head, model_fingerprint
from larv_jax.eval.tasks import Task, get_task, resolve_tasks
from larv_jax.models.clip import CLIP
from larv_jax.models.config import CLIPConfig

# Number of traces of the scoring function per (config, dtype): tests assert recompiles with it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def split_vision(vision_params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"visual": ...}`` without ``visual/proj`` (the merged tower; the projection is pretrained)."""
    if "visual" not in vision_params:
        raise ValueError(f"vision params need a top-level 'visual' subtree; got keys "
                         f"{sorted(vision_params)}")
    return {"visual": {k: v for k, v in vision_params["visual"].items() if k != "proj"}}


def visual_projection(clip_params: Mapping[str, Any]) -> Any:
    try:
        return clip_params["visual"]["proj"]["kernel"]
    except KeyError:
        raise ValueError("clip_params lacks visual/proj/kernel (the pretrained CLIPModel's "
                         "visual_projection is needed)") from None


@functools.cache
def get_score_fn(vision_config: CLIPConfig, dtype: Any = jnp.float32) -> Callable:
    """Jitted ``(vision_params, proj [D, E], head [Cmax, E], class_valid [Cmax], images [B, S, S, 3])
    -> predictions [B] int32``; cached per (config, dtype) (big_vision ``get_eval_fn`` style)."""
    model = CLIP(vision_config.vision_only(), dtype=dtype)
    key = (vision_config.vision_only(), str(jnp.dtype(dtype)))

    @jax.jit
    def score(vision_params, proj, head, class_valid, images):
        TRACE_COUNTS[key] += 1
        pooled = model.apply({"params": vision_params}, images.astype(dtype), False,
                             method=CLIP.encode_image)["pooled"]  # class token only
        feats = pooled.astype(jnp.float32) @ proj.astype(jnp.float32)
        feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
        logits = 100.0 * feats @ head.T
        logits = jnp.where(class_valid[None, :], logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return score


def trace_count(vision_config: CLIPConfig, dtype: Any = jnp.float32) -> int:
    return TRACE_COUNTS[(vision_config.vision_only(), str(jnp.dtype(dtype)))]


def pad_head(head: np.ndarray, max_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``[C, E]`` -> (``[max_classes, E]`` zero-padded, valid mask ``[max_classes]``)."""
    c, e = head.shape
    if c > max_classes:
        raise ValueError(f"head has {c} classes > max_classes={max_classes}; raise max_classes")
    out = np.zeros((max_classes, e), np.float32)
    out[:c] = head
    valid = np.zeros((max_classes,), bool)
    valid[:c] = True
    return out, valid


def top1(vision_params: Mapping[str, Any], proj: Any, head: np.ndarray, task: Task,
         source: Sequence[dict[str, Any]], *, config: CLIPConfig, batch_size: int = 64,
         limit: int | None = None, corruption: data_lib.Corruption | None = None, seed: int = 0,
         dtype: Any = jnp.float32, max_classes: int = 512, num_threads: int = 4,
         progress: bool = False) -> dict[str, Any]:
    """Top-1 accuracy of one task. ``head`` ``[C, E]`` (unit rows). Returns
    ``{"top1", "correct", "n", "seconds"}``; examples whose label maps to -1 are not counted."""
    score = get_score_fn(config, dtype)
    head_p, valid = pad_head(np.asarray(head, np.float32), max_classes)
    head_p, valid, proj = jnp.asarray(head_p), jnp.asarray(valid), jnp.asarray(proj)
    params = jax.tree.map(jnp.asarray, split_vision(vision_params))
    n_total = data_lib.dataset_size(source, limit)
    it = data_lib.batches(task, source, batch_size=batch_size, size=config.vision.image_size,
                          limit=limit, corruption=corruption, seed=seed, num_threads=num_threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, desc=task.name, unit="img", leave=False)
    correct = counted = 0
    t0 = time.perf_counter()
    pending = None  # overlap host batching with device compute: consume the previous result late
    for batch in it:
        preds = score(params, proj, head_p, valid, batch["image"])
        if pending is not None:
            correct, counted = _accumulate(pending, correct, counted, bar)
        pending = (preds, batch["label"], batch["mask"])
    if pending is not None:
        correct, counted = _accumulate(pending, correct, counted, bar)
    if bar is not None:
        bar.close()
    acc = correct / counted if counted else float("nan")
    return {"top1": acc, "correct": correct, "n": counted,
            "seconds": round(time.perf_counter() - t0, 3)}


def _accumulate(pending, correct: int, counted: int, bar) -> tuple[int, int]:
    preds, labels, mask = pending
    preds = np.asarray(preds)
    correct += int(((preds == labels) & mask).sum())
    counted += int(mask.sum())
    if bar is not None:
        bar.update(int(mask.sum()))
    return correct, counted


def evaluate(vision_params: Mapping[str, Any], clip_params: Mapping[str, Any],
             config: CLIPConfig, tasks: str | Sequence[str], data_dir: str | None = None, *,
             tokenizer: Tokenizer | None = None, heads: Mapping[str, np.ndarray] | None = None,
             heads_cache_dir: str | Path | None = None, batch_size: int = 64,
             limit: int | None = None, corruption: str | data_lib.Corruption | None = None,
             severity: int = 3, corruption_table: str = "cifar", seed: int = 0,
             dtype: Any = jnp.float32, max_classes: int = 512, num_threads: int = 4,
             progress: bool = False, sources: Mapping[str, Sequence[Any]] | None = None,
             ) -> dict[str, Any]:
    """Zero-shot top-1 of a vision tower on ``tasks`` (a suite name, ``"a,b"``, or a list of
    registry names, ``zoo/<task>`` names and/or ``Task`` objects for custom tasks).

    vision_params: tree with ``visual/...`` (the merged tower; ``visual/proj`` ignored);
    clip_params: the pretrained CLIPModel tree (``text/...``, ``visual/proj/kernel``);
    config: the pretrained CLIPModel config (the vision tower must match it);
    tokenizer: texts -> ids ``[N, context]`` (``larv_jax.models.tokenizer.load_tokenizer``),
    needed unless ``heads`` gives every task's ``[C, E]`` head;
    corruption: a name of ``larv_jax.eval.corruptions.CORRUPTIONS`` (with ``severity`` 1-5 and
    ``corruption_table`` "cifar" | "imagenet") or a callable ``(uint8 image, Generator) -> image``;
    sources: optional ``{task: data source}`` overriding ``open_source`` (tests, custom data).

    Returns ``{"tasks": {name: {"top1", "correct", "n", "seconds"}}, "average": mean top-1,
    "corruption": name | None, "severity": int | None}``.
    """
    task_list = as_tasks(tasks, data_dir)
    corrupt_fn, corrupt_name = _corruption(corruption, severity, corruption_table)
    fingerprint = None
    results: dict[str, Any] = {}
    for task in task_list:
        name = task.name
        if heads is not None and name in heads:
            head = np.asarray(heads[name], np.float32)
        else:
            if tokenizer is None:
                raise ValueError(f"task {name!r}: no head given and no tokenizer to build one")
            if heads_cache_dir is not None and fingerprint is None:
                fingerprint = model_fingerprint(clip_params)
            head = cached_head(clip_params, config, tokenizer, name, task.classnames,
                               task.templates, cache_dir=heads_cache_dir,
                               fingerprint=fingerprint)
        if head.shape[0] != task.num_classes:
            raise ValueError(f"task {name!r}: head has {head.shape[0]} rows, task has "
                             f"{task.num_classes} classes")
        source = (sources or {}).get(name)
        if source is None:
            source = data_lib.open_source(task, data_dir)
        results[name] = top1(vision_params, visual_projection(clip_params), head, task, source,
                             config=config, batch_size=batch_size, limit=limit,
                             corruption=corrupt_fn, seed=seed, dtype=dtype,
                             max_classes=max_classes, num_threads=num_threads, progress=progress)
    accs = [r["top1"] for r in results.values()]
    return {"tasks": results, "average": float(np.mean(accs)) if accs else float("nan"),
            "corruption": corrupt_name, "severity": severity if corrupt_name else None}


def as_tasks(tasks: str | Sequence[str | Task], data_dir: str | None = None) -> list[Task]:
    """A suite name, ``"a,b"``, or a sequence of names and/or ``Task`` objects -> tasks
    (``data_dir``: where the ``zoo`` suite looks for the zoo's tasks)."""
    if isinstance(tasks, str):
        return [get_task(n) for n in resolve_tasks(tasks, data_dir)]
    out = [t if isinstance(t, Task) else get_task(t) for t in tasks]
    if not out:
        raise ValueError("no tasks given")
    return out


def _corruption(corruption, severity: int, table: str):
    if corruption is None:
        return None, None
    if callable(corruption):
        return corruption, getattr(corruption, "__name__", "custom")
    from larv_jax.eval.corruptions import get_corruption

    return get_corruption(corruption, severity=severity, table=table), corruption


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]
                        ) -> dict[str, Any]:
    """Per-task merged / fine-tuned top-1 and their mean (tasks present in both)."""
    common = [t for t in merged if t in finetuned]
    per = {t: merged[t] / finetuned[t] if finetuned[t] else float("nan") for t in common}
    return {"tasks": per, "average": float(np.mean(list(per.values()))) if per else float("nan")}


def seen_unseen_average(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Unseen-task protocol summary: mean over the 6 merged tasks and over MNIST + EuroSAT."""
    from larv_jax.eval.tasks import UNSEEN_HELD_OUT, UNSEEN_MERGED

    out = {}
    for key, group in (("seen", UNSEEN_MERGED), ("unseen", UNSEEN_HELD_OUT)):
        vals = [accuracies[t] for t in group if t in accuracies]
        out[key] = float(np.mean(vals)) if len(vals) == len(group) else float("nan")
    return out
