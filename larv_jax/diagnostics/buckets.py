"""Shape buckets: how the units' matrices are grouped, laid out and staged for the kernels.

Every matrix of every unit is put into a *shape bucket* keyed by its tall shape ``(m, n)``,
``m >= n`` (singular values and both commutators are invariant under transposing A and D
together), so for ViT-B/32 the buckets are ``[48, 768, 768]`` (q, k, v, out of 12 blocks) and
``[25, 3072, 768]`` (12 fc1, 12 fc2, the patch conv), plus ``[1, 768, 512]`` for ``visual/proj``.
Nothing is copy-transposed: within a bucket the matrices that read tall from their leaf (Flax
dense kernels ``[in, out]``, other leaves in the torch view) form a ``tall`` part and those that
read wide (``mlp/c_fc``, the patch conv) a ``wide`` part (:class:`_Layout`), and the Gram-level
products contract each part along its long axis, giving the same ``n x n`` Grams. Each part is
padded with zero matrices to a multiple of the device count, one contiguous chunk per device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from larv_jax import tree as ltree
from larv_jax.arrays import aligned_empty, copy_into
from larv_jax.diagnostics.unit_rules import Unit


class MatrixRef(NamedTuple):
    unit: int  # index into the unit list
    path: str
    block: int | None
    transposed: bool  # the torch-layout matrix is wide (the bucket shape is its transpose)
    stored_wide: bool = False  # the matrix as read from the leaf (no copy-transpose) is wide


class Bucket(NamedTuple):
    """All matrices of one tall shape ``(m, n)``, ``m >= n``, in unit order."""

    shape: tuple[int, int]
    members: tuple[MatrixRef, ...]

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]


def matrix_shape(path: str, shape: Sequence[int]) -> tuple[int, int]:
    """Torch-layout ``(out, in)`` of one matrix of a leaf (block axis dropped)."""
    return _matrix_shape(path, tuple(int(x) for x in shape))


@functools.lru_cache(maxsize=4096)
def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
    out = jax.eval_shape(lambda x: ltree.to_matrix(path, x), abstract).shape
    out = out[1:] if ltree.is_stacked(path) else out
    if len(out) != 2:
        raise ValueError(f"{path!r} with shape {tuple(shape)} is not a matrix")
    return int(out[0]), int(out[1])


def _stored_wide(path: str, shape: Sequence[int], m: int, n: int) -> bool:
    """Whether the matrix as :func:`_stack` reads it is wide: dense kernels are read in their
    Flax layout ``[in, out]`` (the torch ``[out, in]`` transposed), other leaves via
    :func:`larv_jax.tree.to_matrix` (torch layout)."""
    kind = ltree.leaf_kind(path, ltree.unstacked_ndim(path, shape))
    return n < m if kind == "dense" else m < n


def plan_buckets(unit_list: Sequence[Unit], shapes: Mapping[str, Sequence[int]]
                 ) -> tuple[Bucket, ...]:
    """Group the matrices of ``unit_list`` into shape buckets (first-appearance order)."""
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in shapes.items()}
    groups: dict[tuple[int, int], list[MatrixRef]] = {}
    for i, u in enumerate(unit_list):
        for path, block in u.matrices:
            if path not in shapes:
                raise ValueError(f"parameter {path!r} of unit {u.name!r} is missing")
            m, n = matrix_shape(path, shapes[path])
            groups.setdefault((max(m, n), min(m, n)), []).append(
                MatrixRef(i, path, block, m < n, _stored_wide(path, shapes[path], m, n)))
    return tuple(Bucket(s, tuple(refs)) for s, refs in groups.items())


class _Layout(NamedTuple):
    """How one bucket is laid out over ``n_dev`` devices (processes x local devices).

    Matrices are never copy-transposed: those read tall (``m x n``) go to the ``tall`` part,
    those read wide (``n x m``, e.g. ``mlp/c_fc`` in the Flax layout, the patch conv) to the
    ``wide`` part, and the kernels contract each part along its long axis, so both give the same
    ``n x n`` Grams. Every device gets ``ct`` tall and ``cw`` wide slots (zero padded); per-matrix
    arrays are in *slot* order: device 0's tall slots, its wide slots, device 1's, ...
    """

    tall: tuple[int, ...]  # member indices read tall, in bucket order
    wide: tuple[int, ...]  # member indices read wide
    ct: int
    cw: int
    slots: np.ndarray  # [n_dev * (ct + cw)] member index per slot, -1 for padding


def _layout(bucket: Bucket, n_dev: int) -> _Layout:
    tall = tuple(i for i, r in enumerate(bucket.members) if not r.stored_wide)
    wide = tuple(i for i, r in enumerate(bucket.members) if r.stored_wide)
    ct, cw = math.ceil(len(tall) / n_dev), math.ceil(len(wide) / n_dev)
    slots: list[int] = []
    for dv in range(n_dev):
        for part, c in ((tall, ct), (wide, cw)):
            chunk = list(part[dv * c:(dv + 1) * c])
            slots += chunk + [-1] * (c - len(chunk))
    return _Layout(tall, wide, ct, cw, np.asarray(slots, np.int64))


def _to_slots(x: np.ndarray, lay: _Layout) -> np.ndarray:
    """Member-order ``x`` [N, ...] to slot order (zeros in padding slots)."""
    if len(lay.slots) == x.shape[0] and (lay.slots == np.arange(x.shape[0])).all():
        return x
    out = aligned_empty((len(lay.slots),) + x.shape[1:], x.dtype)
    real = lay.slots >= 0
    out[~real] = 0
    out[real] = x[lay.slots[real]]
    return out


def _from_slots(x: np.ndarray, lay: _Layout) -> np.ndarray:
    if len(lay.slots) == x.shape[0] and (lay.slots == np.arange(x.shape[0])).all():
        return x
    real = lay.slots >= 0
    out = np.empty((len(lay.tall) + len(lay.wide),) + x.shape[1:], x.dtype)
    out[lay.slots[real]] = x[real]
    return out


def _stack(flat: Mapping[str, Any], bucket: Bucket, members: Sequence[int], n_rows: int,
           wide: bool, what: str, out: np.ndarray | None = None) -> Any:
    """``[n_rows, m, n]`` (``[n_rows, n, m]`` if ``wide``) float32 stack of the given members,
    zero padded at the end, without transposing anything.

    Dense kernels are read in their stored Flax layout ``[in, out]`` (the torch matrix
    transposed): e and c are invariant under transposing A and D together. On the host the
    result is 64-byte aligned, so handing it to a CPU device copies nothing; leaves that live on
    an accelerator are stacked there. ``out``: a host buffer of the right shape to fill.
    """
    m, n = bucket.shape
    shape = (n, m) if wide else (m, n)
    for i in members:
        if bucket.members[i].path not in flat:
            raise ValueError(f"{what}: parameter {bucket.members[i].path!r} is missing")
    on_accel = any(isinstance(flat[bucket.members[i].path], jax.Array)
                   and flat[bucket.members[i].path].devices().pop().platform != "cpu"
                   for i in members)
    xp = jnp if on_accel else np
    native: dict[str, Any] = {}

    def matrix(ref: MatrixRef):
        if ref.path not in native:
            leaf = xp.asarray(flat[ref.path], xp.float32)
            kind = ltree.leaf_kind(ref.path, ltree.unstacked_ndim(ref.path, leaf.shape))
            native[ref.path] = leaf if kind == "dense" else ltree.to_matrix(ref.path, leaf)
        mat = native[ref.path] if ref.block is None else native[ref.path][ref.block]
        if tuple(mat.shape) != shape:
            raise ValueError(f"{what}: parameter {_where(ref)} reads as {tuple(mat.shape)}, "
                             f"expected {shape}")
        return mat

    if on_accel:
        mats = [matrix(bucket.members[i]) for i in members]
        mats += [jnp.zeros(shape, jnp.float32)] * (n_rows - len(mats))
        return jnp.stack(mats) if mats else jnp.zeros((0, *shape), jnp.float32)
    out = aligned_empty((n_rows, *shape)) if out is None else out
    out[len(members):] = 0.0
    for j, i in enumerate(members):
        copy_into(out[j], matrix(bucket.members[i]))  # fast for transposed-memory leaves
    return out


def _check_finite(x: np.ndarray, refs: Sequence[MatrixRef], what: str) -> None:
    bad = ~np.isfinite(x[: len(refs)]).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{what}: parameter {_where(refs[int(np.argmax(bad))])} has "
                         "non-finite values")


def _where(ref: MatrixRef) -> str:
    return ref.path if ref.block is None else f"{ref.path}[block {ref.block}]"


def _pad(x: np.ndarray, n_pad: int) -> np.ndarray:
    if x.shape[0] == n_pad:
        return x
    out = aligned_empty((n_pad,) + x.shape[1:], x.dtype)
    out[x.shape[0]:] = 0
    out[: x.shape[0]] = x
    return out
