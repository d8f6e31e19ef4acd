"""Zero-shot evaluation of (merged) CLIP vision towers: task registry, heads, scoring, corruptions.

    from larv_jax.eval import evaluate, TASKS, SUITES
    res = evaluate(vision_params, clip_params, config, "TA8", data_dir, tokenizer=tok)
    res["tasks"]["mnist"]["top1"], res["average"]
"""

from larv_jax.eval.heads import cached_head, model_fingerprint, zero_shot_head
from larv_jax.eval.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, resize_crop
from larv_jax.eval.tasks import (
    ROBUSTNESS_TASKS,
    SUITES,
    TASKS,
    UNSEEN_HELD_OUT,
    UNSEEN_MERGED,
    Task,
    get_task,
    resolve_tasks,
    unseen_protocol,
)
from larv_jax.eval.zero_shot import (
    evaluate,
    get_score_fn,
    normalized_accuracy,
    seen_unseen_average,
    top1,
    trace_count,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ROBUSTNESS_TASKS", "SUITES", "TASKS", "UNSEEN_HELD_OUT",
    "UNSEEN_MERGED", "Task", "cached_head", "clip_preprocess", "evaluate", "get_score_fn",
    "get_task", "model_fingerprint", "normalized_accuracy", "resize_crop", "resolve_tasks",
    "seen_unseen_average", "top1", "trace_count", "unseen_protocol", "zero_shot_head",
]
