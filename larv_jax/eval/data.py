"""Evaluation input: ``tfds.data_source`` (random access, no TensorFlow) -> grain -> fixed-shape batches.

Every batch has the same shape ``[batch_size, size, size, 3]``; the last one is zero-padded and
carries ``mask`` (True = real example) so one compiled scoring function serves every task.
Per-example work (decode, optional corruption, CLIP preprocessing) runs in grain's reader threads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from larv_jax.eval.preprocess import normalize, resize_crop
from larv_jax.eval.tasks import Task

# (uint8 [H, W, 3], Generator) -> uint8 [H, W, 3]; applied after resize + crop.
Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def open_source(task: Task, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
    """The task's split as a random-access TFDS data source (``len``, ``[i]`` -> dict of numpy).

    Raises FileNotFoundError naming the dataset, split and data_dir when it is not prepared.
    """
    import tensorflow_datasets as tfds

    if task.builder is not None:
        importlib.import_module(task.builder)  # registers the local builder with TFDS
    if data_dir is None and task.source.startswith("larv_zoo/"):
        raise ValueError(f"task {task.name!r}: the zoo's tasks are read from a zoo: give its "
                         "directory (larv zoo build --out) as --data-dir (data_dir=)")
    if data_dir is not None and task.source.startswith("larv_zoo/"):
        from larv_jax.eval.tasks import zoo_data_root, zoo_tasks_under

        # a zoo's own directory (``larv zoo build --out ZOO``) stands for its ``data/``
        data_dir = str(zoo_data_root(data_dir) or data_dir)
        short = task.source.split("/", 1)[1]
        have = zoo_tasks_under(data_dir)
        if short not in have:  # checked here: TFDS would leave an empty folder behind
            raise FileNotFoundError(
                f"task {task.name!r}: the zoo data under {data_dir} holds no {short!r} (it has "
                f"{sorted(have) or 'no zoo task'}; the quick zoo has 3 tasks, `larv zoo build` "
                f"without --quick all 8)")
    try:
        return tfds.data_source(task.source, split=task.split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises assorted types (AssertionError, DatasetNotFoundError, ...)
        hint = f" Manual files: {task.manual}." if task.manual else ""
        raise FileNotFoundError(
            f"task {task.name!r}: TFDS dataset {task.source!r} split {task.split!r} is not "
            f"prepared under data_dir={data_dir!r} ({type(e).__name__}: {e}).{hint}") from e


def map_label(task: Task, label: int) -> int:
    """Source label -> task label (-1: not one of the task's classes)."""
    label = int(label)
    if task.label_map is None:
        return label
    if not 0 <= label < len(task.label_map):
        raise ValueError(f"task {task.name!r}: source label {label} outside its label map "
                         f"(0..{len(task.label_map) - 1})")
    return task.label_map[label]


def prepare_example(task: Task, example: dict[str, Any], index: int, *, size: int = 224,
                    corruption: Corruption | None = None, seed: int = 0) -> dict[str, Any]:
    """One TFDS example -> ``{"image": float32 [size, size, 3], "label": int}``.

    The corruption's generator is seeded with ``(seed, index)``: results do not depend on the
    batch size, the thread that ran the example, or the order examples are read in.
    """
    image = np.asarray(example["image"])
    if task.transpose:
        image = np.swapaxes(image, 0, 1)
    image = resize_crop(image, size)
    if corruption is not None:
        image = corruption(image, np.random.default_rng([seed, index]))
    return {"image": normalize(image), "label": map_label(task, example["label"])}


def collate(examples: Sequence[dict[str, Any]], batch_size: int, size: int) -> dict[str, np.ndarray]:
    """Stack and zero-pad to ``batch_size``; ``mask`` marks real examples with a task label."""
    n = len(examples)
    images = np.zeros((batch_size, size, size, 3), np.float32)
    labels = np.full((batch_size,), -1, np.int32)
    for i, ex in enumerate(examples):
        images[i] = ex["image"]
        labels[i] = ex["label"]
    mask = np.zeros((batch_size,), bool)
    mask[:n] = labels[:n] >= 0
    return {"image": images, "label": labels, "mask": mask}


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def batches(task: Task, source: Sequence[dict[str, Any]], *, batch_size: int, size: int = 224,
            limit: int | None = None, corruption: Corruption | None = None, seed: int = 0,
            num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches ``{"image" [B, S, S, 3], "label" [B], "mask" [B]}`` over ``source``.

    ``limit`` keeps the first ``limit`` examples (deterministic, for smoke runs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[: max(0, int(limit))]
    ds = ds.map_with_index(lambda i, ex: prepare_example(task, ex, i, size=size,
                                                         corruption=corruption, seed=seed))
    ds = ds.batch(batch_size, batch_fn=lambda exs: collate(exs, batch_size, size))
    threads = max(1, num_threads)
    # a buffer below the thread count idles threads (and grain warns on every task)
    opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))
    return iter(ds.to_iter_dataset(opts))


def dataset_size(source: Sequence[Any], limit: int | None = None) -> int:
    n = len(source)
    return n if limit is None else min(n, max(0, int(limit)))
