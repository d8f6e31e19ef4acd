"""Corruptions: shape/dtype/range at any size, seed determinism, stated statistics, severity growth."""

from __future__ import annotations

import numpy as np
import pytest

from larv_jax.eval.corruptions import (
    CORRUPTIONS,
    TABLES,
    corrupt,
    get_corruption,
    motion_kernel,
)

RANDOM = {"motion_blur", "impulse_noise", "gaussian_noise", "spatter"}


def _image(h=64, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(np.sin(xx / 5) + 1) * 100 + 20, (np.cos(yy / 7) + 1) * 100 + 20,
                     ((xx + yy) % 32) * 7], -1).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", [(17, 31), (64, 64), (224, 160)])
def test_shape_dtype_determinism(name, shape):
    img = _image(*shape)
    for table in TABLES:
        a = corrupt(img, name, severity=3, table=table, seed=5)
        b = corrupt(img, name, severity=3, table=table, seed=5)
        assert a.shape == img.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        if name in RANDOM and shape != (17, 31):
            c = corrupt(img, name, severity=3, table=table, seed=6)
            assert not np.array_equal(a, c)


def _distortion(name, table, severity):
    img = _image()
    return np.mean([np.abs(corrupt(img, name, severity=severity, table=table, seed=s)
                           .astype(np.float64) - img).mean() for s in range(3)])


@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_distortion_grows_with_severity(name, table):
    d = [_distortion(name, table, s) for s in range(1, 6)]
    assert d[0] > 0 and d[4] > d[0]
    if (name, table) == ("spatter", "cifar"):
        return  # the CIFAR table switches from water (1-3) to mud (4-5): not monotone by design
    assert all(b >= a - 0.05 for a, b in zip(d[:-1], d[1:], strict=True)), d


def test_stated_statistics():
    gray = np.full((128, 128, 3), 128, np.uint8)
    # Gaussian noise: std c * 255 (far from the clipping bounds).
    x = corrupt(gray, "gaussian_noise", severity=1, table="cifar", seed=0).astype(np.float64)
    assert abs(x.std() - 0.04 * 255) < 0.3
    # Impulse noise: a fraction c of the elements become 0 or 255, half each.
    x = corrupt(gray, "impulse_noise", severity=5, table="imagenet", seed=0)
    hit = (x == 0) | (x == 255)
    assert abs(hit.mean() - 0.27) < 0.01 and abs((x == 255).mean() / hit.mean() - 0.5) < 0.02
    # Contrast: (x - mean) * c + mean, by hand on a two-valued image.
    img = np.zeros((2, 2, 3), np.uint8)
    img[0] = 200
    x = corrupt(img, "contrast", severity=1, table="cifar")
    # (float /255 round trip, then truncation to uint8 as the references do: off by <= 1)
    np.testing.assert_allclose(x[0], np.full((2, 3), (200 - 100) * 0.75 + 100), atol=1)
    np.testing.assert_allclose(x[1], np.full((2, 3), (0 - 100) * 0.75 + 100), atol=1)
    # Pixelate at factor 0.5 (BOX): 2x2 blocks become their mean.
    img = _image(8, 8)
    x = get_corruption("pixelate", severity=2, table="imagenet")(img, np.random.default_rng(0))
    np.testing.assert_allclose(x[0, 0], img[:2, :2].reshape(-1, 3).mean(0), atol=1)


def test_motion_kernel():
    w, off = motion_kernel(3, 1.5, 0.0)
    assert w.shape == (7,) and abs(w.sum() - 1) < 1e-12 and np.all(np.diff(w) < 0)
    np.testing.assert_array_equal(off, np.stack([np.zeros(7), np.arange(7)], 1))
    _, off = motion_kernel(2, 1.0, 45.0)
    np.testing.assert_array_equal(off[:, 0], off[:, 1])
    # Angles lie in [-45, 45] degrees, so a vertical edge always smears into intermediate values,
    # while a constant image stays constant (weights sum to 1, edges replicated).
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, 8:] = 255
    for seed in range(3):
        out = corrupt(img, "motion_blur", severity=3, table="imagenet", seed=seed)
        assert ((out > 0) & (out < 255)).any()
    flat = np.full((16, 16, 3), 77, np.uint8)
    assert np.abs(corrupt(flat, "motion_blur", severity=5).astype(int) - 77).max() <= 1


def test_errors():
    with pytest.raises(ValueError, match="valid"):
        get_corruption("fog")
    with pytest.raises(ValueError, match="severity"):
        get_corruption("contrast", severity=6)
    with pytest.raises(ValueError, match="table"):
        get_corruption("contrast", table="tiny")
    with pytest.raises(ValueError, match="uint8"):
        corrupt(np.zeros((4, 4, 3), np.float32), "contrast")
    assert get_corruption("jpeg").__name__ == "jpeg_compression"
