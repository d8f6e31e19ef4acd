"""Local TFDS builders over fake official archives, read back through ``open_source``."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from larv_jax.eval.builders import eurosat, fer2013, gtsrb, rendered_sst2, resisc45
from larv_jax.eval.data import open_source
from larv_jax.eval.tasks import get_task


def _img(h, w, value, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _prepare(builder_cls, manual, data_dir):
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))


def _read(task_name, data_dir):
    src = open_source(get_task(task_name), str(data_dir))
    return [(int(src[i]["label"]), np.asarray(src[i]["image"])) for i in range(len(src))]


def test_gtsrb(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    labels = {f"{i:05d}.ppm": (i * 7) % 43 for i in range(6)}
    with zipfile.ZipFile(manual / "GTSRB_Final_Test_Images.zip", "w") as z:
        for name, lab in labels.items():
            z.writestr(f"GTSRB/Final_Test/Images/{name}", _img(30 + lab, 31, lab * 5, "PPM"))
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    rows += [f"{n};31;{30 + lab};5;5;20;20;{lab}" for n, lab in labels.items()]
    with zipfile.ZipFile(manual / "GTSRB_Final_Test_GT.zip", "w") as z:
        z.writestr("GT-final_test.csv", "\n".join(rows) + "\n")
    _prepare(gtsrb.LarvGtsrb, manual, tmp_path / "data")
    got = _read("gtsrb", tmp_path / "data")
    assert len(got) == 6
    for lab, img in got:  # the image encodes its label in size and value
        assert img.shape == (30 + lab, 31, 3) and (img == lab * 5).all()


def test_fer2013_label_map(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = ["emotion,pixels,Usage"]
    usage = ["Training", "PublicTest", "PrivateTest"]
    for code in range(7):
        for k in range(3):
            lines.append(f"{code},{' '.join([str(code * 30)] * 2304)},{usage[k]}")
    (manual / "fer2013.csv").write_text("\n".join(lines) + "\n")
    _prepare(fer2013.LarvFer2013, manual, tmp_path / "data")
    got = _read("fer2013", tmp_path / "data")
    assert len(got) == 14  # PublicTest + PrivateTest
    names_csv = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    classnames = get_task("fer2013").classnames
    for lab, img in got:
        code = int(img[0, 0, 0]) // 30
        assert classnames[lab].startswith(names_csv[code][:4])  # 'sad' -> 'sad', 'fear' -> ...
        assert img.shape == (48, 48, 3)


def test_rendered_sst2_from_tgz(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "rendered-sst2.tgz", "w:gz") as tar:
        for split, n in (("train", 2), ("valid", 1), ("test", 3)):
            for label, cls in enumerate(("negative", "positive")):
                for i in range(n):
                    data = _img(20, 40, 100 * label + 10, "PNG")
                    info = tarfile.TarInfo(f"rendered-sst2/{split}/{cls}/{i}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    _prepare(rendered_sst2.LarvRenderedSst2, manual, tmp_path / "data")
    got = _read("rendered_sst2", tmp_path / "data")
    assert len(got) == 6 and sorted(lab for lab, _ in got) == [0, 0, 0, 1, 1, 1]
    assert all((img == 100 * lab + 10).all() for lab, img in got)


@pytest.mark.parametrize("with_list", [True, False])
def test_eurosat(tmp_path, with_list):
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "EuroSAT.zip", "w") as z:
        for label, cls in enumerate(eurosat.CLASSES):
            for i in range(10):
                z.writestr(f"2750/{cls}/{cls}_{i + 1}.jpg", _img(64, 64, 20 * label, "JPEG"))
    if with_list:
        for split in ("train", "val", "test"):
            k = {"train": range(1, 9), "val": [9], "test": [10]}[split]
            names = [f"{c}_{i}.jpg" for c in eurosat.CLASSES for i in k]
            (manual / f"eurosat-{split}.txt").write_text("\n".join(names) + "\n")
    _prepare(eurosat.LarvEurosat, manual, tmp_path / "data")
    got = _read("eurosat", tmp_path / "data")
    assert len(got) == 10 and sorted(lab for lab, _ in got) == list(range(10))
    for lab, img in got:
        assert abs(float(img.mean()) - 20 * lab) < 3  # JPEG of a constant image


def test_resisc45(tmp_path):
    manual = tmp_path / "manual"
    picks = [(0, "airplane"), (2, "baseball_diamond"), (44, "wetland")]
    names = []
    for label, cls in picks:
        (manual / "NWPU-RESISC45" / cls).mkdir(parents=True)
        name = f"{cls}_{label + 1:03d}.jpg"
        (manual / "NWPU-RESISC45" / cls / name).write_bytes(_img(256, 256, 5 * label, "JPEG"))
        names.append(name)
    for split in ("train", "val"):
        (manual / f"resisc45-{split}.txt").write_text(names[0] + "\n")
    (manual / "resisc45-test.txt").write_text("\n".join(names) + "\n")
    _prepare(resisc45.LarvResisc45, manual, tmp_path / "data")
    got = _read("resisc45", tmp_path / "data")
    assert sorted(lab for lab, _ in got) == [0, 2, 44]
    assert get_task("resisc45").classnames[44] == "wetland"


def test_eurosat_fallback_split_is_a_partition():
    by_class = {c: [f"{c}_{i}.jpg" for i in range(1, 31)] for c in eurosat.CLASSES}
    parts = [eurosat.fallback_split(by_class, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [240, 30, 30]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_missing_manual_files_are_named(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(Exception, match="fer2013.csv"):
        _prepare(fer2013.LarvFer2013, tmp_path / "manual", tmp_path / "data")
