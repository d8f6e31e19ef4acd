"""The offline model zoo: a tiny CLIP and its fine-tunes, built from nothing in minutes on a CPU.

Nobody can download CLIP weights or the 20 task datasets offline, yet the whole larv_jax pipeline
(checkpoint loading, task vectors, mergers, LARV diagnostics and gates, TFDS evaluation) needs
trained models and real test splits to be exercised. The zoo provides both:

    from larv_jax.zoo import build_zoo, open_zoo
    build_zoo("results/zoo", seed=0)            # or quick=True for a seconds-scale zoo (tests)
    zoo = open_zoo("results/zoo")
    zoo.pretrained                              # HF CLIPModel dir (+ tokenizer.json)
    zoo.finetuned["shapes"]                     # HF CLIPVisionModel dir
    zoo.eval_tasks()                            # larv_jax.eval.Task objects over zoo.data_dir
    zoo.manifest["tasks"]["shapes"]             # zero-shot / fine-tuned top-1, sizes, ...

Checkpoints load through :func:`larv_jax.checkpoint.load_params` like real ones; the datasets read
through ``tfds.data_source("larv_zoo/<task>", data_dir=zoo.data_dir)`` and
:func:`larv_jax.eval.evaluate`. See :mod:`larv_jax.zoo.build` for the procedure and
:mod:`larv_jax.zoo.tasks` for the tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from larv_jax.io import read_json
from larv_jax.zoo.build import (
    MANIFEST,
    QUICK,
    ZooSpec,
    ZooState,
    build_zoo,
    clip_config,
    train_zoo,
    write_zoo,
    zoo_spec,
)
from larv_jax.zoo.tasks import (
    QUICK_TASKS,
    TFDS_NAME,
    ZOO_TASKS,
    ZooTask,
    get_zoo_task,
)


class Zoo(NamedTuple):
    """A built zoo on disk (see :func:`open_zoo`)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["tasks"])

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def finetuned(self) -> dict[str, Path]:
        return {t: self.root / "finetuned" / t for t in self.task_names}

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def eval_tasks(self) -> list[Any]:
        """The zoo's tasks as :class:`larv_jax.eval.Task` (test splits of ``larv_zoo/<task>``)."""
        return [eval_task(t) for t in self.task_names]


def eval_task(name: str) -> Any:
    """The zoo task ``name`` as a :class:`larv_jax.eval.Task`
    (:func:`larv_jax.eval.tasks.zoo_eval_task`; ``larv eval`` calls it ``zoo/<name>``)."""
    from larv_jax.eval.tasks import zoo_eval_task

    return zoo_eval_task(name)


def open_zoo(root: str | Path) -> Zoo:
    """Open a built zoo; FileNotFoundError naming the manifest when there is none."""
    root = Path(root)
    manifest = read_json(root / MANIFEST,
                         missing="no zoo manifest (build one with `larv zoo build`)")
    return Zoo(root, manifest)


__all__ = [
    "MANIFEST", "QUICK", "QUICK_TASKS", "TFDS_NAME", "ZOO_TASKS", "Zoo", "ZooSpec", "ZooState",
    "ZooTask", "train_zoo", "write_zoo",
    "build_zoo", "clip_config", "eval_task", "get_zoo_task", "open_zoo", "zoo_spec",
]
