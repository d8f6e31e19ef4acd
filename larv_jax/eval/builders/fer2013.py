"""FER2013 from the Kaggle ``fer2013.csv`` (48x48 grayscale), labels in FusionBench's order.

The CSV codes emotions 0..6 = angry, disgust, fear, happy, sad, surprise, neutral; FusionBench
(clip-benchmark's ``wds_fer2013``) orders them alphabetically: angry, disgusted, fearful, happy,
neutral, sad, surprised. ``CSV_LABEL_MAP`` converts when writing, so stored labels are task labels.
"""

from __future__ import annotations

import csv

import numpy as np
import tensorflow_datasets as tfds

from larv_jax.eval.builders._common import need, png_bytes

CSV_LABEL_MAP = (0, 1, 2, 3, 5, 6, 4)  # CSV code -> FusionBench label
USAGE = {"train": ("Training",), "test": ("PublicTest", "PrivateTest")}


class LarvFer2013(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place Kaggle's fer2013.csv (emotion,pixels,Usage) in the manual dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(48, 48, 3)),
            "label": tfds.features.ClassLabel(num_classes=7)}))

    def _split_generators(self, dl_manager):
        path = need(dl_manager.manual_dir / "fer2013.csv", "Kaggle fer2013.csv")
        return {split: self._generate_examples(path, usages) for split, usages in USAGE.items()}

    def _generate_examples(self, path, usages):
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if row["Usage"] not in usages:
                    continue
                pixels = np.array(row["pixels"].split(), np.uint8)
                if pixels.size != 48 * 48:
                    raise ValueError(f"{path}: row {i} has {pixels.size} pixels, expected 2304")
                img = np.repeat(pixels.reshape(48, 48, 1), 3, axis=-1)
                yield i, {"image": png_bytes(img), "label": CSV_LABEL_MAP[int(row["emotion"])]}
