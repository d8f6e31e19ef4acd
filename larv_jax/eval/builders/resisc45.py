"""NWPU-RESISC45 re-split with Google's ``resisc45-{train,val,test}.txt`` (test 6,300 images)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from larv_jax.eval.builders._common import need, read_list
from larv_jax.eval.classnames import RESISC45

CLASSES = tuple(c.replace(" ", "_") for c in RESISC45)  # folder names, alphabetical
SPLITS = {"train": "train", "validation": "val", "test": "test"}


class LarvResisc45(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract NWPU-RESISC45.rar into the manual dir (NWPU-RESISC45/<class>/<class>_NNN.jpg) "
        "and add resisc45-{train,val,test}.txt (one file name per line).")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(256, 256, 3)),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "filename": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {s: self._generate_examples(root, name) for s, name in SPLITS.items()}

    def _generate_examples(self, root, split):
        images = need(root / "NWPU-RESISC45", "extracted image folder")
        for base in read_list(need(root / f"resisc45-{split}.txt", "split list")):
            base = base.rsplit("/", 1)[-1]
            cls = base.rsplit("_", 1)[0]
            if cls not in CLASSES:
                raise ValueError(f"resisc45-{split}.txt: {base} names no known class")
            path = need(images / cls / base, f"listed in resisc45-{split}.txt")
            yield base, {"image": path.read_bytes(), "label": CLASSES.index(cls), "filename": base}
