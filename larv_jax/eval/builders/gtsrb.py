"""GTSRB test split (12,630 images, 43 classes) from the official archives (torchvision layout)."""

from __future__ import annotations

import csv
import io
import zipfile

import tensorflow_datasets as tfds
from PIL import Image

from larv_jax.eval.builders._common import need, png_bytes


class LarvGtsrb(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place GTSRB_Final_Test_Images.zip and GT-final_test.csv (or GTSRB_Final_Test_GT.zip) "
        "from https://benchmark.ini.rub.de/gtsrb_dataset.html in the manual dir.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=43),
            "filename": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(dl_manager.manual_dir)}

    def _generate_examples(self, root):
        images = need(root / "GTSRB_Final_Test_Images.zip", "test images")
        gt = root / "GT-final_test.csv"
        if gt.exists():
            rows = gt.read_text().splitlines()
        else:
            with zipfile.ZipFile(need(root / "GTSRB_Final_Test_GT.zip", "test labels")) as z:
                rows = z.read("GT-final_test.csv").decode().splitlines()
        labels = {r["Filename"]: int(r["ClassId"]) for r in csv.DictReader(rows, delimiter=";")}
        with zipfile.ZipFile(images) as z:
            for name in sorted(z.namelist()):
                base = name.rsplit("/", 1)[-1]
                if not base.endswith(".ppm"):
                    continue
                if base not in labels:
                    raise ValueError(f"{images}: {base} has no row in GT-final_test.csv")
                img = Image.open(io.BytesIO(z.read(name)))
                yield base, {"image": png_bytes(img), "label": labels[base], "filename": base}
