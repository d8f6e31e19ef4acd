"""EuroSAT RGB re-split into train/val/test (TFDS ``eurosat`` has a train split only).

Label order = TFDS ``eurosat`` (= FusionBench). Split lists ``eurosat-<split>.txt`` (file names)
in the manual dir are used when present; otherwise a deterministic 80/10/10 split per class
(sorted names permuted by ``np.random.default_rng(0)``), which is NOT task_vectors' exact split.
"""

from __future__ import annotations

import zipfile

import numpy as np
import tensorflow_datasets as tfds

from larv_jax.eval.builders._common import need, read_list

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake")
SPLITS = {"train": "train", "validation": "val", "test": "test"}


def fallback_split(names_by_class: dict[str, list[str]], split: str) -> set[str]:
    """Deterministic 80/10/10 split per class (see module docstring)."""
    out: set[str] = set()
    for cls in CLASSES:
        names = sorted(names_by_class.get(cls, []))
        perm = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
        n_test = n_val = len(names) // 10
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
                 "train": perm[n_test + n_val:]}
        out.update(parts[split])
    return out


class LarvEurosat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file; TFDS would look it up via importlib_resources
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place EuroSAT.zip (RGB, https://madm.dfki.de/files/sentinel/EuroSAT.zip) and optionally "
        "eurosat-{train,val,test}.txt (one file name per line) in the manual dir.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(64, 64, 3)),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "filename": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {s: self._generate_examples(root, name) for s, name in SPLITS.items()}

    def _generate_examples(self, root, split):
        archive = need(root / "EuroSAT.zip", "EuroSAT RGB archive")
        with zipfile.ZipFile(archive) as z:
            files = {}
            for name in z.namelist():
                parts = name.split("/")
                if name.endswith(".jpg") and len(parts) >= 2 and parts[-2] in CLASSES:
                    files[parts[-1]] = (name, parts[-2])
            lst = root / f"eurosat-{split}.txt"
            if lst.exists():
                keep = {n.rsplit("/", 1)[-1] for n in read_list(lst)}
                missing = sorted(keep - set(files))
                if missing:
                    raise ValueError(f"{lst}: {len(missing)} files not in {archive}, e.g. "
                                     f"{missing[0]}")
            else:
                by_class: dict[str, list[str]] = {}
                for base, (_, cls) in files.items():
                    by_class.setdefault(cls, []).append(base)
                keep = fallback_split(by_class, split)
            for base in sorted(keep):
                name, cls = files[base]
                yield base, {"image": z.read(name), "label": CLASSES.index(cls), "filename": base}
