"""Task registry: suites, templates, class names vs TFDS label files, label maps, mock data."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from larv_jax.eval import data as data_lib
from larv_jax.eval.preprocess import clip_preprocess
from larv_jax.eval.tasks import (
    SUITES,
    TASKS,
    UNSEEN_HELD_OUT,
    UNSEEN_MERGED,
    get_task,
    resolve_tasks,
)

TFDS_TASKS = list(TASKS)  # local builders too: mock_data serves any registered builder


def test_suites_in_fusionbench_order():
    assert len(TASKS) == 20
    assert SUITES["TA8"] == ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb",
                             "mnist", "dtd")
    assert SUITES["TALL14"][8:] == ("oxford_flowers102", "pcam", "fer2013", "oxford_iiit_pet",
                                    "stl10", "cifar100")
    assert SUITES["TALL20"][14:] == ("cifar10", "food101", "fashion_mnist", "emnist_letters",
                                     "kmnist", "rendered_sst2")
    assert set(UNSEEN_MERGED + UNSEEN_HELD_OUT) <= set(TASKS)
    assert resolve_tasks("mnist, dtd") == ("mnist", "dtd")
    assert len(resolve_tasks("UNSEEN")) == 8
    with pytest.raises(ValueError, match="valid"):
        resolve_tasks("mnist,imagenet")


def test_class_counts_and_templates():
    counts = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10,
              "gtsrb": 43, "mnist": 10, "dtd": 47, "oxford_flowers102": 102, "pcam": 2,
              "fer2013": 7, "oxford_iiit_pet": 37, "stl10": 10, "cifar100": 100, "cifar10": 10,
              "food101": 101, "fashion_mnist": 10, "emnist_letters": 26, "kmnist": 10,
              "rendered_sst2": 2}
    for name, task in TASKS.items():
        assert task.num_classes == counts[name], name
        assert len(set(task.classnames)) == task.num_classes, name
        for tpl in task.templates:
            assert tpl.count("{}") == 1, (name, tpl)
    # Spot facts from FusionBench's lists and openai/CLIP prompts.
    assert TASKS["sun397"].classnames[27] == "bakery shop"
    assert TASKS["stanford_cars"].classnames[-1] == "smart fortwo Convertible 2012"
    assert TASKS["eurosat"].prompts[0][0] == "a centered satellite photo of annual crop land."
    assert TASKS["pcam"].prompts[1] == ("this is a photo of lymph node containing metastatic "
                                        "tumor tissue",)
    assert TASKS["rendered_sst2"].prompts[1] == ("a positive review of a movie.",)
    assert len(TASKS["resisc45"].templates) == 18 and len(TASKS["cifar10"].templates) == 18


_KANA = {"o": "お", "ki": "き", "su": "す", "tsu": "つ", "na": "な", "ha": "は", "ma": "ま",
         "ya": "や", "re": "れ", "wo": "を"}


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower().replace("_", " ") if ch.isalnum())


@pytest.mark.parametrize("name", ["sun397", "stanford_cars", "dtd", "oxford_flowers102",
                                  "oxford_iiit_pet", "food101", "fashion_mnist", "kmnist"])
def test_classnames_follow_tfds_label_order(name):
    task = get_task(name)
    tfds_names = tfds.builder(task.source).info.features["label"].names
    if name == "sun397":
        tfds_names = [n.split("/", 2)[2] for n in tfds_names]
    if name == "kmnist":
        tfds_names = [_KANA[n] for n in tfds_names]
    assert [_norm(n) for n in tfds_names] == [_norm(n) for n in task.classnames]


def test_emnist_letters_label_map_and_transpose():
    task = get_task("emnist_letters")
    assert tfds.builder(task.source).info.features["label"].num_classes == len(task.label_map)
    assert data_lib.map_label(task, 1) == 0 and task.classnames[0] == "A"
    assert data_lib.map_label(task, 26) == 25 and task.classnames[25] == "Z"
    assert data_lib.map_label(task, 0) == -1 and data_lib.map_label(task, 36) == -1
    with pytest.raises(ValueError, match="label map"):
        data_lib.map_label(task, 37)
    img = np.zeros((28, 28, 1), np.uint8)
    img[2, 20] = 255  # row 2, column 20 -> after transpose row 20, column 2
    ex = data_lib.prepare_example(task, {"image": img, "label": 3}, 0, size=28)
    assert ex["label"] == 2
    np.testing.assert_array_equal(ex["image"], clip_preprocess(img.transpose(1, 0, 2), 28))
    assert ex["image"][20, 2, 0] > ex["image"][2, 20, 0]


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_mock_data_through_pipeline(name):
    task = get_task(name)
    if task.builder is not None:  # open_source registers it; tfds.builder below runs first
        importlib.import_module(task.builder)
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        info = tfds.builder(task.source).info
        n_source = info.features["label"].num_classes
        assert n_source == (len(task.label_map) if task.label_map else task.num_classes)
        src = data_lib.open_source(task)
        out = list(data_lib.batches(task, src, batch_size=4, size=32, num_threads=1))
    assert len(out) == 2
    for b in out:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert np.isfinite(b["image"]).all()
        assert ((b["label"][b["mask"]] >= 0) & (b["label"][b["mask"]] < task.num_classes)).all()
    assert out[1]["mask"][1:].sum() == 0  # 5 examples: the last batch has 1 real + 3 padding
    if task.label_map is None:
        assert out[0]["mask"].all() and out[1]["mask"][0]


def test_zoo_task_names_and_suite(tmp_path):
    """zoo/<task> names resolve to the zoo's TFDS datasets under the zoo's own name; the zoo
    suite is the zoo tasks prepared under --data-dir (a zoo's data/ or the zoo itself), in the
    zoo's order; a bare zoo name, an unknown one, a duplicate or a directory without zoo data is
    a one-line error naming it."""
    from larv_jax.eval.tasks import zoo_suite
    from larv_jax.zoo.tasks import ZOO_TASKS

    t = get_task("zoo/colours")
    assert (t.name, t.source, t.split) == ("zoo/colours", "larv_zoo/colours", "test")
    assert t.classnames == ZOO_TASKS["colours"].classnames
    assert t.templates == ZOO_TASKS["colours"].templates
    assert resolve_tasks("zoo/digits, mnist") == ("zoo/digits", "mnist")
    assert resolve_tasks("zoo") == tuple("zoo/" + n for n in ZOO_TASKS)  # no data_dir: all 8
    with pytest.raises(ValueError, match=r"'colours' is a zoo task: write zoo/colours"):
        get_task("colours")
    with pytest.raises(ValueError, match=r"unknown zoo task 'zoo/mnist'"):
        get_task("zoo/mnist")
    with pytest.raises(ValueError, match=r"'mnist' given twice"):
        resolve_tasks("mnist,dtd,mnist")

    # a fake prepared layout: <zoo>/data/larv_zoo/<task>/1.0.0/dataset_info.json
    zoo = tmp_path / "zoo"
    for name in ("textures", "colours"):
        v = zoo / "data" / "larv_zoo" / name / "1.0.0"
        v.mkdir(parents=True)
        (v / "dataset_info.json").write_text("{}")
    (zoo / "data" / "larv_zoo" / "shapes" / "1.0.0").mkdir(parents=True)  # not prepared
    order = ("zoo/colours", "zoo/textures")  # the zoo's task order, not the directory's
    assert zoo_suite(zoo) == order and zoo_suite(zoo / "data") == order
    assert resolve_tasks("zoo", str(zoo)) == order
    with pytest.raises(FileNotFoundError, match=rf"--data-dir {tmp_path}: no zoo data here"):
        zoo_suite(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no 'shapes' \(it has \['colours', "
                                                r"'textures'\]"):
        data_lib.open_source(get_task("zoo/shapes"), str(zoo))
    with pytest.raises(ValueError, match=r"'zoo/colours': the zoo's tasks are read from a zoo"):
        data_lib.open_source(get_task("zoo/colours"), None)
    assert not any((zoo / "data" / "larv_zoo" / "shapes" / "1.0.0").iterdir())  # nothing written
