"""CLIP preprocessing against transformers' CLIPImageProcessorPil (PIL backend, same recipe)."""

from __future__ import annotations

import numpy as np
import pytest

from larv_jax.eval.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, resize_crop


@pytest.mark.parametrize("shape", [(50, 70, 3), (71, 40, 3), (224, 224, 3), (300, 301, 3),
                                   (28, 28, 1), (33, 45)])
def test_matches_transformers(shape):
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = pil.CLIPImageProcessorPil()  # shortest_edge 224, crop 224, bicubic, OpenAI mean/std
    img = (np.random.default_rng(sum(shape)).random(shape) * 255).astype(np.uint8)
    ref_in = img if img.ndim == 3 and img.shape[-1] == 3 else np.repeat(
        img.reshape(*img.shape[:2], 1), 3, axis=-1)
    ref = proc(images=[ref_in], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    out = clip_preprocess(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_hand_computed_crop_and_normalisation():
    # 2x4 constant-per-column image, target 2: no resize, centre crop keeps columns 1..2.
    img = np.tile(np.array([0, 51, 102, 255], np.uint8)[None, :, None], (2, 1, 3))
    out = resize_crop(img, 2)
    np.testing.assert_array_equal(out[0, :, 0], [51, 102])
    x = clip_preprocess(img, 2)
    np.testing.assert_allclose(x[0, 0], (0.2 - CLIP_MEAN) / CLIP_STD, rtol=1e-6)
    # RGBA drops alpha; float input is refused.
    rgba = np.concatenate([img, np.full((2, 4, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(resize_crop(rgba, 2), out)
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(img.astype(np.float32))
