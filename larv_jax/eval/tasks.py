"""The 20 image-classification tasks of the CLIP merging line of work, and the FusionBench suites.

``TASKS`` is one literal dict ``name -> Task``. Names are FusionBench's. A task reads one TFDS
split through ``tfds.data_source`` (no TensorFlow); where TFDS lacks the task or its test split,
``source`` names a local builder in ``larv_jax.eval.builders`` that prepares the official archives
from a manual directory (see that package). Where the source orders or offsets labels differently
from the class-name list, ``label_map`` maps source label -> task label (-1 = not a task class).

Known differences from FusionBench's Hugging Face copies (REFERENCE.md §1): SUN397 uses TFDS's
re-encoded ``standard-part1-120k`` (same partition); EMNIST-Letters uses TFDS ``emnist/letters``
(test 14,800 images, FusionBench 20,800); EuroSAT and RESISC45 need split lists (see the builders).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from larv_jax.eval import classnames as cn


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation task.

    source: TFDS name (with config) or a ``larv_*`` local builder name; split: the evaluated split;
    classnames: in task-label order; templates: ``str.format`` patterns with one ``{}``;
    label_map: ``label_map[source_label] = task_label`` (-1 drops the example), None = identity;
    transpose: images stored transposed (swap H and W); builder: module that registers a local
    builder (imported before reading); manual: what the local builder expects in its manual dir.
    """

    name: str
    source: str
    split: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    label_map: tuple[int, ...] | None = None
    transpose: bool = False
    builder: str | None = None
    manual: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def prompts(self) -> tuple[tuple[str, ...], ...]:
        """``[C][T]`` formatted prompts."""
        return tuple(tuple(t.format(c) for t in self.templates) for c in self.classnames)


# EMNIST letters in TFDS: ClassLabel(37) with the letters A..Z at 1..26 -> 0..25.
EMNIST_LETTERS_LABEL_MAP = (-1,) + tuple(range(26)) + (-1,) * 10

_B = "larv_jax.eval.builders"

TASKS: dict[str, Task] = {
    "sun397": Task("sun397", "sun397/standard-part1-120k", "test", cn.SUN397,
                   cn.TEMPLATES["sun397"]),
    "stanford_cars": Task("stanford_cars", "cars196", "test", cn.STANFORD_CARS,
                          cn.TEMPLATES["stanford_cars"],
                          manual="cars196: ai.stanford.edu links are dead; place the files "
                                 "TFDS expects in its manual/download dir"),
    "resisc45": Task("resisc45", "larv_resisc45", "test", cn.RESISC45, cn.TEMPLATES["resisc45"],
                     builder=f"{_B}.resisc45",
                     manual="NWPU-RESISC45/ (extracted) + resisc45-{train,val,test}.txt"),
    "eurosat": Task("eurosat", "larv_eurosat", "test", cn.EUROSAT, cn.TEMPLATES["eurosat"],
                    builder=f"{_B}.eurosat", manual="EuroSAT.zip (RGB) + eurosat-test.txt"),
    "svhn": Task("svhn", "svhn_cropped", "test", cn.SVHN, cn.TEMPLATES["svhn"]),
    "gtsrb": Task("gtsrb", "larv_gtsrb", "test", cn.GTSRB, cn.TEMPLATES["gtsrb"],
                  builder=f"{_B}.gtsrb",
                  manual="GTSRB_Final_Test_Images.zip + GT-final_test.csv (or GTSRB_Final_Test_GT.zip)"),
    "mnist": Task("mnist", "mnist", "test", cn.MNIST, cn.TEMPLATES["mnist"]),
    "dtd": Task("dtd", "dtd", "test", cn.DTD, cn.TEMPLATES["dtd"]),
    "oxford_flowers102": Task("oxford_flowers102", "oxford_flowers102", "test",
                              cn.OXFORD_FLOWERS102, cn.TEMPLATES["oxford_flowers102"]),
    "pcam": Task("pcam", "patch_camelyon", "test", cn.PCAM, cn.TEMPLATES["pcam"]),
    "fer2013": Task("fer2013", "larv_fer2013", "test", cn.FER2013, cn.TEMPLATES["fer2013"],
                    builder=f"{_B}.fer2013", manual="fer2013.csv (Kaggle; test = PublicTest + "
                                                    "PrivateTest)"),
    "oxford_iiit_pet": Task("oxford_iiit_pet", "oxford_iiit_pet", "test", cn.OXFORD_IIIT_PET,
                            cn.TEMPLATES["oxford_iiit_pet"]),
    "stl10": Task("stl10", "stl10", "test", cn.STL10, cn.TEMPLATES["stl10"]),
    "cifar100": Task("cifar100", "cifar100", "test", cn.CIFAR100, cn.TEMPLATES["cifar100"]),
    "cifar10": Task("cifar10", "cifar10", "test", cn.CIFAR10, cn.TEMPLATES["cifar10"]),
    "food101": Task("food101", "food101", "validation", cn.FOOD101, cn.TEMPLATES["food101"]),
    "fashion_mnist": Task("fashion_mnist", "fashion_mnist", "test", cn.FASHION_MNIST,
                          cn.TEMPLATES["fashion_mnist"]),
    "emnist_letters": Task("emnist_letters", "emnist/letters", "test", cn.EMNIST_LETTERS,
                           cn.TEMPLATES["emnist_letters"], label_map=EMNIST_LETTERS_LABEL_MAP,
                           transpose=True),
    "kmnist": Task("kmnist", "kmnist", "test", cn.KMNIST, cn.TEMPLATES["kmnist"]),
    "rendered_sst2": Task("rendered_sst2", "larv_rendered_sst2", "test", cn.RENDERED_SST2,
                          cn.TEMPLATES["rendered_sst2"], builder=f"{_B}.rendered_sst2",
                          manual="rendered-sst2.tgz (openai/CLIP) or its extracted folder"),
}

_ORDER = tuple(TASKS)  # FusionBench order: TA8 = first 8, TALL14 = first 14, TALL20 = all
SUITES: dict[str, tuple[str, ...]] = {
    "TA8": _ORDER[:8],
    "TALL14": _ORDER[:14],
    "TALL20": _ORDER,
}

# Unseen-task protocol (SPEC §8): merge these 6, evaluate on them plus the 2 held-out tasks.
UNSEEN_MERGED = ("sun397", "stanford_cars", "resisc45", "dtd", "svhn", "gtsrb")
UNSEEN_HELD_OUT = ("mnist", "eurosat")
# Tasks FusionBench evaluates under corruption (SPEC §8).
ROBUSTNESS_TASKS = ("stanford_cars", "eurosat", "resisc45", "gtsrb")


# The offline zoo's tasks (``larv zoo build``): ``zoo/<task>`` names and the ``zoo`` suite, read
# from the zoo's TFDS data (``larv_zoo/<task>``, test split) under the data_dir: the zoo's ``data``
# directory or the zoo's own directory (see :func:`larv_jax.eval.data.open_source`).
ZOO_PREFIX = "zoo/"
ZOO_SUITE = "zoo"


def _zoo_names() -> tuple[str, ...]:
    from larv_jax.zoo.tasks import ZOO_TASKS

    return tuple(ZOO_TASKS)


def zoo_eval_task(name: str) -> Task:
    """The zoo task ``name`` as a :class:`Task` reading ``larv_zoo/<name>`` (test split) through
    ``tfds.data_source`` (pass the zoo's ``data`` dir as ``data_dir``); named as in the zoo
    (``colours``), where :func:`get_task` names it ``zoo/colours``. Here, not in
    :mod:`larv_jax.zoo.tasks`, so that the zoo's task list never imports the evaluation."""
    from larv_jax.zoo.tasks import TFDS_BUILDER_MODULE, TFDS_NAME, get_zoo_task

    t = get_zoo_task(name)
    return Task(name=t.name, source=f"{TFDS_NAME}/{t.name}", split="test",
                classnames=t.classnames, templates=t.templates, builder=TFDS_BUILDER_MODULE,
                manual="run `larv zoo build` to write the zoo's TFDS datasets")


def get_task(name: str) -> Task:
    """The task called ``name``: one of :data:`TASKS` or ``zoo/<task>`` (a zoo task, named so in
    every result)."""
    if name.startswith(ZOO_PREFIX):
        short = name[len(ZOO_PREFIX):]
        if short not in _zoo_names():
            raise ValueError(f"unknown zoo task {name!r}; valid: "
                             f"{[ZOO_PREFIX + n for n in _zoo_names()]}")
        return dataclasses.replace(zoo_eval_task(short), name=name)
    try:
        return TASKS[name]
    except KeyError:
        hint = ""
        if name in _zoo_names():
            hint = (f" ({name!r} is a zoo task: write {ZOO_PREFIX}{name}, or --tasks "
                    f"{ZOO_SUITE} for every task of the zoo under --data-dir)")
        raise ValueError(f"unknown task {name!r}{hint}; valid: {sorted(TASKS)}, "
                         f"{ZOO_PREFIX}<task> for the zoo's tasks, or a suite: "
                         f"{[*SUITES, 'UNSEEN', ZOO_SUITE]}") from None


def zoo_suite(data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The ``zoo`` suite: ``zoo/<task>`` for every zoo task whose TFDS data lies under
    ``data_dir`` (a zoo's ``data`` directory or the zoo itself; the quick zoo has three), in the
    zoo's task order; every zoo task when ``data_dir`` is None. FileNotFoundError naming the
    directory when it holds no zoo data."""
    from larv_jax.zoo.tasks import TFDS_NAME

    if data_dir is None:
        return tuple(ZOO_PREFIX + n for n in _zoo_names())
    root = zoo_data_root(data_dir)
    if root is None:
        raise FileNotFoundError(f"--data-dir {data_dir}: no zoo data here (expected "
                                f"{Path(data_dir) / TFDS_NAME} or "
                                f"{Path(data_dir) / 'data' / TFDS_NAME}; build a zoo with "
                                f"`larv zoo build`)")
    have = zoo_tasks_under(root)
    names = tuple(ZOO_PREFIX + n for n in _zoo_names() if n in have)
    if not names:
        raise FileNotFoundError(f"{root / TFDS_NAME}: holds none of the zoo's tasks "
                                f"{list(_zoo_names())}")
    return names


def zoo_data_root(data_dir: str | Path) -> Path | None:
    """The TFDS data_dir that holds the zoo's datasets for ``data_dir``: itself when it holds
    ``larv_zoo/``, its ``data/`` subdirectory when it is a zoo's own directory, else None."""
    from larv_jax.zoo.tasks import TFDS_NAME

    d = Path(data_dir)
    for cand in (d, d / "data"):
        if (cand / TFDS_NAME).is_dir():
            return cand
    return None


def zoo_tasks_under(root: str | Path) -> set[str]:
    """The zoo tasks whose prepared TFDS data (a version folder with ``dataset_info.json``) lies
    under the TFDS data_dir ``root``."""
    from larv_jax.zoo.tasks import TFDS_NAME

    base = Path(root) / TFDS_NAME
    if not base.is_dir():
        return set()
    return {t.name for t in base.iterdir() if t.is_dir()
            and any((v / "dataset_info.json").is_file() for v in t.iterdir() if v.is_dir())}


def resolve_tasks(spec: str | list[str] | tuple[str, ...],
                  data_dir: str | Path | None = None) -> tuple[str, ...]:
    """``"TA8"`` / ``"TALL14"`` / ``"TALL20"`` / ``"UNSEEN"`` / ``"zoo"`` / ``"a,b"`` / a list ->
    task names. ``data_dir`` only matters for ``"zoo"`` (see :func:`zoo_suite`)."""
    if isinstance(spec, str):
        if spec in SUITES:
            return SUITES[spec]
        if spec == "UNSEEN":
            return UNSEEN_MERGED + UNSEEN_HELD_OUT
        if spec == ZOO_SUITE:
            return zoo_suite(data_dir)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = tuple(spec)
    if not names:
        raise ValueError("no tasks given")
    for n in names:
        get_task(n)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"task {dup[0]!r} given twice")
    return names


def unseen_protocol() -> dict[str, tuple[str, ...]]:
    """The unseen-task protocol: which tasks to merge and which to evaluate (seen + held out)."""
    return {"merge": UNSEEN_MERGED, "seen": UNSEEN_MERGED, "unseen": UNSEEN_HELD_OUT,
            "evaluate": UNSEEN_MERGED + UNSEEN_HELD_OUT}
