"""TFDS builder ``larv_zoo``: one builder config per zoo task, written as array_record.

Importing this module registers the builder, so ``tfds.data_source("larv_zoo/<task>",
data_dir=<zoo>/data)`` (and :func:`larv_jax.eval.evaluate` with :func:`larv_jax.zoo.eval_task`)
read the prepared files with no TensorFlow. Images are handed to TFDS as PNG bytes (a numpy image
would go through a TensorFlow encoder). Preparing needs the arrays: :func:`write_task` passes them
to the builder; reading never calls the generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from larv_jax.zoo.tasks import TFDS_NAME, ZOO_TASKS


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes (deterministic: fixed compression, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class LarvZoo(tfds.core.GeneratorBasedBuilder):
    """The offline zoo's tasks (``larv_zoo/<task>``): 32x32 RGB images and class labels."""

    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial zoo."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t.name, description=t.description)
                       for t in ZOO_TASKS.values()]

    def __init__(self, *, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 **kwargs):
        self._arrays = arrays
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        task = ZOO_TASKS[self.builder_config.name]
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(task.classnames)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/larv-jax",
        )

    def _split_generators(self, dl_manager):
        if self._arrays is None:
            raise ValueError(f"{TFDS_NAME}/{self.builder_config.name}: nothing to prepare; the "
                             "zoo writes these datasets (`larv zoo build`)")
        return {split: self._generate_examples(split) for split in self._arrays}

    def _generate_examples(self, split: str):
        images, labels = self._arrays[split]
        for i in range(len(labels)):
            yield i, {"image": png_bytes(images[i]), "label": int(labels[i])}


def write_task(name: str, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
               data_dir: str | Path) -> Path:
    """Prepare ``larv_zoo/<name>`` under ``data_dir`` from ``{split: (uint8 [N, 32, 32, 3],
    int labels [N])}``; returns the dataset's directory."""
    from tensorflow_datasets.core.utils import tqdm_utils

    builder = LarvZoo(config=name, data_dir=str(data_dir), arrays=arrays,
                      file_format="array_record")
    was_active = tqdm_utils._active
    tfds.display_progress_bar(False)  # TFDS's own bars and banners: the zoo reports progress
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, num_shards=1))
    finally:
        tfds.display_progress_bar(was_active)
    return Path(builder.data_dir)


def records_digest(name: str, split: str, data_dir: str | Path) -> str:
    """sha256 of a prepared split's decoded examples (image bytes, label) in file order.

    The raw array_record bytes are not reproducible across processes: TFDS serialises each
    tf.Example's feature map in an order that varies from process to process (same records,
    same size, permuted bytes). The decoded content and the record order are reproducible.
    """
    images, labels = read_split(name, split, data_dir)
    h = hashlib.sha256()
    for img, lab in zip(images, labels, strict=True):
        h.update(img.tobytes())
        h.update(int(lab).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def read_split(name: str, split: str, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole prepared split back (``tfds.data_source``): uint8 images and int64 labels."""
    src = tfds.data_source(f"{TFDS_NAME}/{name}", split=split, data_dir=str(data_dir),
                           download=False)
    n = len(src)
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty((n,), np.int64)
    for i in range(n):
        ex = src[i]
        images[i] = ex["image"]
        labels[i] = ex["label"]
    return images, labels
