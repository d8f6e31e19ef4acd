"""Rendered SST2 (openai/CLIP ``data/rendered-sst2.md``): train 6,920 / validation 872 / test 1,821."""

from __future__ import annotations

import tarfile

import tensorflow_datasets as tfds

from larv_jax.eval.builders._common import need

CLASSES = ("negative", "positive")
SPLITS = {"train": "train", "validation": "valid", "test": "test"}


class LarvRenderedSst2(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place rendered-sst2.tgz (https://openaipublic.azureedge.net/clip/data/rendered-sst2.tgz) "
        "or its extracted rendered-sst2/ folder in the manual dir.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {split: self._generate_examples(root, folder) for split, folder in SPLITS.items()}

    def _generate_examples(self, root, folder):
        folder_root = root / "rendered-sst2"
        if folder_root.is_dir():
            for label, cls in enumerate(CLASSES):
                for p in sorted((folder_root / folder / cls).glob("*.png")):
                    yield f"{cls}/{p.name}", {"image": p.read_bytes(), "label": label}
            return
        with tarfile.open(need(root / "rendered-sst2.tgz", "archive or folder")) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                parts = m.name.split("/")
                if not m.isfile() or len(parts) < 3 or parts[-3] != folder:
                    continue
                if parts[-2] not in CLASSES or not parts[-1].endswith(".png"):
                    continue
                yield f"{parts[-2]}/{parts[-1]}", {"image": tar.extractfile(m).read(),
                                                   "label": CLASSES.index(parts[-2])}
