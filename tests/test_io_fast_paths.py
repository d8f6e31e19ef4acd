"""The hot-path helpers the merge engine relies on, each against an independent reference:
tiled transposes vs numpy, the streaming safetensors writer vs the ``safetensors`` package's own
reader, native-order leaves vs the default ones, streamed task sums vs a float64 numpy sum, and
in-place application vs ``theta0 + s * D``."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from larv_jax import tree
from larv_jax.arrays import aligned_empty, contiguous, copy_into, memory_order, swapped_buffer
from larv_jax.checkpoint import load_checkpoint, save_hf
from larv_jax.checkpoint.sources import write_safetensors
from larv_jax.merging import METHODS, TaskVectors, apply_delta, merge_delta
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, VisionConfig

VCFG = CLIPConfig(vision=VisionConfig(width=16, layers=3, heads=2, mlp_dim=80, image_size=16,
                                      patch_size=8))


@pytest.mark.parametrize("shape", [(200, 70), (64, 65), (3, 5000), (1, 9)])
def test_copy_into_transposed_views_matches_numpy(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = copy_into(np.empty(shape[::-1], np.float32), x.T)
    np.testing.assert_array_equal(got, x.T)
    assert got.flags.c_contiguous
    # into a float64 destination (casting) and into a transposed destination (numpy path)
    np.testing.assert_array_equal(copy_into(np.empty(shape[::-1]), x.T), x.T.astype(np.float64))
    dst = swapped_buffer(shape[::-1])
    np.testing.assert_array_equal(copy_into(dst, x.T), x.T)
    with pytest.raises(ValueError, match="shapes differ"):
        copy_into(np.empty(shape, np.float32), x.T[:1])


def test_contiguous_memory_order_and_alignment():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    s = x.swapaxes(-1, -2)
    view, swapped = memory_order(s)
    assert swapped and view.flags.c_contiguous and np.shares_memory(view, x)
    same, swapped = memory_order(x)
    assert same is x and not swapped
    c = contiguous(s)
    assert c.flags.c_contiguous and np.array_equal(c, s)
    a = aligned_empty((5, 7), np.float64)
    assert a.ctypes.data % 64 == 0 and a.shape == (5, 7) and a.dtype == np.float64


def test_write_safetensors_round_trips_through_the_reference_reader(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "a.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "b": rng.standard_normal((3,)).astype(np.float16),
        "c": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "d": np.arange(6, dtype=np.int64).reshape(2, 3),
        "e": np.zeros((0, 4), np.float32),
        "f": np.array(3.5, np.float64),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].astype(np.float64), v.astype(np.float64))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0  # header padded to 8 bytes
    with pytest.raises(ValueError, match="not C-contiguous"):
        write_safetensors(tmp_path / "y.safetensors", {"t": tensors["a.weight"].T})


def _params(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {p: (scale * rng.standard_normal(s.shape)).astype(np.float32)
            for p, s in tree.flatten(abstract_params(VCFG)).items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    base = _params(0)
    models = [{p: v + _params(10 + k, 0.01)[p] for p, v in base.items()} for k in range(3)]
    save_hf(base, VCFG, root / "base")
    for k, m in enumerate(models):
        save_hf(m, VCFG, root / f"m{k}")
    return root, base, models


def test_native_leaves_hold_the_same_values_in_the_source_order(ckpts):
    root, base, _ = ckpts
    c = load_checkpoint(root / "base")
    for p in c.paths():
        default, native = c.leaf(p), c.leaf(p, native=True)
        np.testing.assert_array_equal(native, base[p], err_msg=p)
        np.testing.assert_array_equal(default, base[p], err_msg=p)
        assert default.flags.c_contiguous
        if c.stores_transposed(p):  # HF dense kernels: [out, in] in memory
            assert not native.flags.c_contiguous and native.swapaxes(-1, -2).flags.c_contiguous
        # reading into a caller's buffer of either order
        out = swapped_buffer(native.shape) if native.ndim >= 2 else np.empty(native.shape,
                                                                             np.float32)
        np.testing.assert_array_equal(c.leaf(p, out=out), base[p])


def test_task_sums_and_read_ahead_match_numpy(ckpts):
    root, base, models = ckpts
    b = load_checkpoint(root / "base")
    ms = [load_checkpoint(root / f"m{k}") for k in range(3)]
    tv = TaskVectors(b, ms, b.paths(), reuse_buffers=True)
    order = list(b.paths())
    # in order (read-ahead used), then one out of order (read-ahead abandoned)
    for p in order + [order[0]]:
        want = np.sum([(m[p] - base[p]).astype(np.float64) for m in models], axis=0)
        np.testing.assert_allclose(tv.task_sum(p), want, rtol=0, atol=1e-12, err_msg=p)
        np.testing.assert_array_equal(tv[p], np.stack([m[p] - base[p] for m in models]))
    tv.close()


def test_streamed_task_arithmetic_and_inplace_apply_match_in_memory(ckpts):
    root, base, models = ckpts
    tv = {p: np.stack([m[p] - base[p] for m in models]) for p in base}
    want = METHODS["task_arithmetic"](tv)
    delta, _ = merge_delta(root / "base", [root / f"m{k}" for k in range(3)], "task_arithmetic",
                           hash_inputs=False)
    for p in want:
        np.testing.assert_array_equal(delta[p], want[p], err_msg=p)
    scales = {p: 0.5 for p in delta}
    expect = {p: base[p] + np.float32(0.5) * want[p] for p in base}
    got = apply_delta(root / "base", dict(delta), scales=scales, consume=True, inplace=True)
    for p in expect:
        np.testing.assert_allclose(got[p], expect[p], rtol=0, atol=1e-6, err_msg=p)
    with pytest.raises(ValueError, match="consume"):
        apply_delta(root / "base", delta, inplace=True)


def test_chunked_raw_reads_match_leafwise_reads_and_numpy(ckpts, monkeypatch):
    """The cache-sized chunk path (float32 safetensors) against the per-model leaf path and a
    numpy reference, with chunks that straddle nothing and do not divide the blocks."""
    from larv_jax.merging import stream

    root, base, models = ckpts
    b = load_checkpoint(root / "base")
    ms = [load_checkpoint(root / f"m{k}") for k in range(3)]
    kernel = "visual/transformer/resblocks/mlp/c_fc/kernel"
    layout, swapped = ms[0].raw_layout(kernel)
    assert swapped and len(layout) == VCFG.vision.layers            # one span per block
    assert ms[0].raw_layout("visual/conv1/kernel") is None           # the conv needs a reshape
    monkeypatch.setattr(stream, "_CHUNK", 37)                        # 1280-element blocks
    fast = TaskVectors(b, ms, b.paths(), read_ahead_bytes=1)
    slow = TaskVectors(b, ms, b.paths())
    monkeypatch.setattr(slow, "_raw_layouts", lambda path, leaf: None)
    for p in b.paths():
        want_stack = np.stack([m[p] - base[p] for m in models])
        want_sum = np.sum(want_stack.astype(np.float64), axis=0)
        got_sum, slow_sum = fast.task_sum(p), slow.task_sum(p)
        np.testing.assert_array_equal(got_sum, slow_sum, err_msg=p)
        np.testing.assert_allclose(got_sum, want_sum, rtol=0, atol=1e-12, err_msg=p)
        np.testing.assert_array_equal(fast[p], want_stack, err_msg=p)
        assert fast.task_sum(p).flags.c_contiguous == slow_sum.flags.c_contiguous
    fast.close(), slow.close()


def test_chunked_reads_fall_back_for_other_dtypes_and_layouts(ckpts, tmp_path):
    """A bfloat16 model (upcast on read) and a C-order in-memory base both take the leaf path
    and give the same sums."""
    import ml_dtypes

    from larv_jax.merging import TreeSource

    root, base, models = ckpts
    half = {p: v.astype(ml_dtypes.bfloat16) for p, v in models[0].items()}
    save_hf(half, VCFG, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    b = load_checkpoint(root / "base")
    ms = [load_checkpoint(tmp_path / "bf16"), load_checkpoint(root / "m1")]
    kernel = "visual/transformer/resblocks/attn/query/kernel"
    assert ms[0].raw_layout(kernel) is None
    tv = TaskVectors(b, ms, b.paths())
    want = (half[kernel].astype(np.float32) - base[kernel]).astype(np.float64) + (
        models[1][kernel] - base[kernel]).astype(np.float64)
    np.testing.assert_array_equal(tv.task_sum(kernel), want)
    flat = TaskVectors(TreeSource(base), [load_checkpoint(root / "m1")], list(base))
    assert flat._raw_layouts(kernel, base[kernel]) is None           # C order vs [out, in]
    np.testing.assert_array_equal(flat.task_sum(kernel),
                                  (models[1][kernel] - base[kernel]).astype(np.float64))
    tv.close(), flat.close()


def test_chunked_reads_name_the_file_with_nan_and_a_truncated_file(ckpts, tmp_path):
    from larv_jax.merging import stream

    root, base, models = ckpts
    bad = {p: v.copy() for p, v in models[2].items()}
    bad["visual/transformer/resblocks/mlp/c_proj/kernel"][1, 3, 5] = np.nan
    save_hf(bad, VCFG, tmp_path / "nan")
    b = load_checkpoint(root / "base")
    ms = [load_checkpoint(root / "m0"), load_checkpoint(tmp_path / "nan")]
    tv = TaskVectors(b, ms, b.paths())
    path = "visual/transformer/resblocks/mlp/c_proj/kernel"
    assert tv._raw_layouts(path, b.leaf(path, native=True)) is not None
    with pytest.raises(ValueError, match=r"nan.*c_proj/kernel.*1 NaN/Inf"):
        tv.task_sum(path)
    with pytest.raises(ValueError, match=r"nan.*c_proj/kernel.*1 NaN/Inf"):
        tv[path]
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 10)
    import os

    fd = os.open(short, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="short.bin: truncated"):
            stream._pread(fd, np.empty(4, np.float32), 0, short)
    finally:
        os.close(fd)
    tv.close()


@pytest.mark.parametrize("raw", [True, False])
def test_read_ahead_survives_skips_rereads_and_scale_changes(ckpts, monkeypatch, raw):
    """Callers that skip leaves, go back, or switch between sums and scaled sums get the right
    numbers (the leaf path shares one scratch buffer between the read-ahead and the caller)."""
    root, base, models = ckpts
    b = load_checkpoint(root / "base")
    ms = [load_checkpoint(root / f"m{k}") for k in range(3)]
    tv = TaskVectors(b, ms, b.paths(), reuse_buffers=True, read_ahead_bytes=1 << 30)
    if not raw:
        monkeypatch.setattr(tv, "_raw_layouts", lambda path, leaf: None)
    order = list(b.paths())
    calls = [(order[0], None), (order[3], None), (order[1], None), (order[4], 0.5),
             (order[5], 0.5), (order[6], None), (order[-1], 0.5), (order[2], 0.5)]
    for p, scale in calls:
        want = np.sum([(m[p] - base[p]).astype(np.float64) for m in models], axis=0)
        got = tv.task_sum(p, scale)
        if scale is None:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=p)
        else:
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, (want * scale).astype(np.float32), err_msg=p)
    tv.close()
