"""Batched, sharded LARV diagnostics: shape buckets, a per-base cache, and ``diagnose``.

Every matrix of every unit is put into a *shape bucket* keyed by its tall shape ``(m, n)``,
``m >= n`` (singular values and both commutators are invariant under transposing A and D
together), so for ViT-B/32 the buckets are ``[48, 768, 768]`` (q, k, v, out of 12 blocks) and
``[25, 3072, 768]`` (12 fc1, 12 fc2, the patch conv), plus ``[1, 768, 512]`` for ``visual/proj``.
Nothing is copy-transposed: within a bucket the matrices that read tall from their leaf (Flax
dense kernels ``[in, out]``, other leaves in the torch view) form a ``tall`` part and those that
read wide (``mlp/c_fc``, the patch conv) a ``wide`` part, and the Gram-level products contract each
part along its long axis, giving the same ``n x n`` Grams; everything after is batched over the
whole bucket. The kernels of ``larv_jax.diagnostics.kernels`` are vmapped and jit-compiled once
per bucket (``TRACES`` counts the traces).

Devices: the bucket (matrix) axis is split over ``devices`` (default ``jax.local_devices()``):
each part is padded with zero matrices to a multiple of the device count (padding dropped after)
and each device gets one contiguous chunk of each part (``_Layout``). Two executions are
available (``execution=``):

- ``"per_device"`` (default): the jitted, vmapped kernel is dispatched once per device on its
  chunk (``jax.device_put(chunk, device)``); one trace per bucket shape (XLA compiles it once
  per device). Accelerators run concurrently (async dispatch); CPU devices, which share the host
  cores anyway, run one after another. No communication is needed.
- ``"spmd"``: one ``jax.jit(jax.shard_map(...))`` over a 1-D ``Mesh(devices, ("b",))`` with inputs
  placed by ``NamedSharding(mesh, P("b"))``. Same numbers; NOT the default because on this
  jaxlib (0.10.2, XLA:CPU, 2 fake devices on 2 cores) SPMD programs that mix LAPACK custom calls
  (Cholesky, eigvalsh, sytrd) intermittently hung (all threads idle, one device's execution never
  completing), both with shard_map and with jit + NamedSharding; concurrent per-device
  dispatch hung too, rarely; sequential per-device dispatch on CPU has not.

Multi-host: call ``jax.distributed.initialize()`` on every host, then make the same
``base_cache``/``diagnose`` call with the same inputs on every host. With ``per_device`` each
process takes the contiguous slice ``process_index`` of every bucket, runs it on its local devices
and the slices are exchanged with ``multihost_utils.process_allgather``; with ``spmd`` pass
``devices=jax.devices()`` (the global list) and the mesh spans all hosts.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from larv_jax import tree as ltree
from larv_jax.arrays import aligned_empty, copy_into
from larv_jax.diagnostics import kernels as K
from larv_jax.diagnostics.record import Diagnostics, MatrixDiag
from larv_jax.diagnostics.unit_rules import Unit

MODES = ("randomized", "exact")

# Traces of the per-bucket functions (one per compiled bucket shape); tests count them.
TRACES: collections.Counter[str] = collections.Counter()


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


class BaseCache(NamedTuple):
    """Everything that depends only on theta0, computed once per pretrained model.

    Per bucket (tuples aligned with ``plan``; host numpy arrays, so one cache serves any device
    count): ``reff`` [N] r_eff(theta0) (exact by default), ``norm`` [N] ||theta0||_F, ``gram``
    [N, n, n] = A^T A of the tall view (None for square buckets, whose Eq. 6 commutator does not
    use it), and ``stack``, the bucket's theta0 matrices themselves (as read: the tall ones
    ``[N_t, m, n]`` and the wide ones ``[N_w, n, m]``, see ``_Layout``), so that
    :func:`diagnose` does not gather them again for every merge (the cache therefore holds one
    float32 copy of the units' matrices: 0.35 GB for ViT-B/32, 1.2 GB for ViT-L/14).
    ``plan`` and ``mode`` are static metadata. ``workspace`` is :func:`diagnose`'s reusable
    staging memory (the update's stacks and the slot-ordered cache arrays): allocating and
    zeroing ~0.35 GB of fresh pages per call measured 0.3-0.5 s of a ~2 s ViT-B/32 call on the
    2-core CPU. It is used by one call at a time (a concurrent call stages in fresh memory) and
    freed with the cache.

    ``base_cache(..., store=DIR)`` keeps ``reff``, ``norm`` and ``gram`` on disk, keyed by the
    content of the stacked theta0 matrices (:func:`base_fingerprint`), so that repeated merges of
    one base in separate processes compute them once; ``source`` says where they came from.
    """

    plan: tuple[Bucket, ...]
    reff: tuple[np.ndarray, ...]
    norm: tuple[np.ndarray, ...]
    gram: tuple[np.ndarray | None, ...]
    mode: str
    stack: tuple[tuple[np.ndarray, np.ndarray], ...]
    workspace: _Workspace
    source: str = "computed"  # or the file it was read from (``base_cache(store=...)``)


class _Workspace:
    """Named staging buffers, reused across :func:`diagnose` calls by one caller at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: dict[Any, np.ndarray] = {}

    def get(self, name: Any, make: Callable[[], np.ndarray]) -> np.ndarray:
        if name not in self.buffers:
            self.buffers[name] = make()
        return self.buffers[name]


EXECUTIONS = ("per_device", "spmd")


class _Placement(NamedTuple):
    """Where a bucket runs: local ``devices``; this process's slice of every bucket."""

    devices: tuple[jax.Device, ...]
    execution: str
    mesh: Mesh | None

    @property
    def size(self) -> int:
        return len(self.devices)


def _placement(devices: Sequence[jax.Device] | None, execution: str) -> _Placement:
    if execution not in EXECUTIONS:
        raise ValueError(f"unknown execution {execution!r}; valid: {list(EXECUTIONS)}")
    if execution == "spmd":
        devs = tuple(devices) if devices is not None else tuple(jax.devices())
        return _Placement(devs, execution, Mesh(np.array(devs), ("b",)))
    devs = tuple(devices) if devices is not None else tuple(jax.local_devices())
    return _Placement(devs, execution, None)


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


def _n_dev(place: _Placement) -> int:
    if place.execution == "per_device":
        return place.size * jax.process_count()
    return place.size


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


def _run(fn: Callable, args: Sequence[Any], place: _Placement) -> Any:
    """Run ``fn`` on this process's share; host results in slot order.

    Every arg is split along axis 0 into ``n_dev`` equal chunks (each arg's own chunk size:
    ``[tall stacks, wide stacks, per-matrix arrays]`` have different lengths).
    """
    if place.execution == "spmd":
        sharding = NamedSharding(place.mesh, P("b"))
        out = fn(*[jax.device_put(a, sharding) for a in args])
        return jax.tree.map(_fetch, out)
    n_dev = _n_dev(place)
    first_dev = jax.process_index() * place.size if jax.process_count() > 1 else 0
    outs = []
    # Accelerators: async dispatch, the devices run concurrently. Host (CPU) "devices" share the
    # same cores, so concurrency buys nothing there, and concurrent LAPACK-backed executables on
    # several fake CPU devices were seen to deadlock (all threads in futex wait) under load:
    # run them one after the other.
    serial = all(d.platform == "cpu" for d in place.devices)
    for i, dev in enumerate(place.devices):
        dv = first_dev + i
        chunk_args = []
        for a in args:
            c = a.shape[0] // n_dev
            chunk_args.append(jax.device_put(a[dv * c:(dv + 1) * c], dev))
        outs.append(fn(*chunk_args))
        if serial:
            jax.block_until_ready(outs[-1])
    local = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), local)
    return local


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


def _fetch(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _keys(key: jax.Array, bucket_index: int, lay: _Layout) -> np.ndarray:
    """Raw keys in slot order: member i gets ``fold_in(fold_in(key, bucket), i)``, independent
    of the device count and padding (padding slots get keys no member uses)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    kb = jax.random.fold_in(key, bucket_index)
    n_real = len(lay.tall) + len(lay.wide)
    ids = np.where(lay.slots >= 0, lay.slots, n_real + np.arange(len(lay.slots)))
    return np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(kb, jnp.asarray(ids, jnp.uint32)))


def _products(x_t: jax.Array, y_t: jax.Array, x_w: jax.Array, y_w: jax.Array) -> jax.Array:
    """``[ct + cw, n, n]``: ``X^T Y`` of the tall part, then ``X Y^T`` of the wide part (the same
    n x n product of the tall view, contracted along the long axis without a transpose)."""
    parts = []
    if x_t.shape[0]:
        parts.append(jnp.einsum("bmi,bmj->bij", x_t, y_t))
    if x_w.shape[0]:
        parts.append(jnp.einsum("bim,bjm->bij", x_w, y_w))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _norms(x_t: jax.Array, x_w: jax.Array) -> jax.Array:
    return jnp.concatenate([jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2))) for x in (x_t, x_w)])


def _entropy(a: jax.Array, g: jax.Array, key: jax.Array, mode: str, k: int, p: int, q: int):
    """Exact: from the Gram. Randomized: on the Gram when it is at hand (n x n x k' products),
    else on the matrix itself."""
    if mode == "exact":
        return K.gram_entropy(g)
    if g is not None:
        return K.randomized_gram_entropy(g, key, k=k, p=p, q=q)
    return K.randomized_entropy(a, key, k=k, p=p, q=q)


@functools.cache
def _base_fn(mesh: Mesh | None, square: bool, mode: str, k: int, p: int, q: int) -> Callable:
    def local(a_t, a_w, keys):
        TRACES["base"] += 1
        g = _products(a_t, a_t, a_w, a_w)
        reff = jax.vmap(lambda g, key: jnp.exp(_entropy(None, g, key, mode, k, p, q)))(g, keys)
        return reff, _norms(a_t, a_w), (None if square else g)

    return _compile(local, mesh)


@functools.cache
def _diag_fn(mesh: Mesh | None, square: bool, mode: str, k: int, p: int, q: int, eps: float,
             zero_rtol: float) -> Callable:
    def finish(c, g_d, d, key, reff_a, norm_a, norm_d):
        reff_d = jnp.exp(_entropy(d, g_d, key, mode, k, p, q))
        e = K.contrast(reff_a, reff_d, norm_a, norm_d, eps=eps, zero_rtol=zero_rtol)
        return {"e": e, "c": c, "reff_delta": reff_d, "norm_delta": norm_d}

    def square_one(a, d, key, reff_a, norm_a):
        # Square matrices are read as stored ([in, out] = the torch matrix transposed): the Eq. 6
        # numerator only changes sign, the spectrum not at all.
        c = K.square_commutator(a, d, eps=eps)
        g_d = d.T @ d if mode == "exact" else None
        return finish(c, g_d, d, key, reff_a, norm_a, jnp.linalg.norm(d))

    def rect_one(g_a, g_d, y, key, reff_a, norm_a, norm_d):
        c = K.gram_commutator_from_grams(g_a, g_d, y, norm_a, norm_d, eps=eps)
        return finish(c, g_d, None, key, reff_a, norm_a, norm_d)

    def local_square(a_t, a_w, d_t, d_w, keys, reff_a, norm_a):
        TRACES["diagnose"] += 1
        del a_w, d_w  # a square matrix is never wide
        return jax.vmap(square_one)(a_t, d_t, keys, reff_a, norm_a)

    def local_rect(a_t, a_w, d_t, d_w, keys, reff_a, norm_a, g_a):
        TRACES["diagnose"] += 1
        g_d = _products(d_t, d_t, d_w, d_w)
        y = _products(a_t, d_t, a_w, d_w)
        return jax.vmap(rect_one)(g_a, g_d, y, keys, reff_a, norm_a, _norms(d_t, d_w))

    return _compile(local_square if square else local_rect, mesh)


def _compile(fn: Callable, mesh: Mesh | None) -> Callable:
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("b"), out_specs=P("b")))


def _check_args(mode: str, k: int, p: int, q: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown diagnostics mode {mode!r}; valid: {list(MODES)}")
    if k < 1 or p < 0 or q < 0:
        raise ValueError(f"randomized SVD needs k >= 1, p >= 0, q >= 0; got k={k}, p={p}, q={q}")


def base_cache(base_flat: Mapping[str, Any], unit_list: Sequence[Unit], *, mode: str = "exact",
               key: jax.Array | None = None, k: int = 64, p: int = 10, q: int = 2,
               devices: Sequence[jax.Device] | None = None,
               execution: str = "per_device",
               store: str | os.PathLike | None = None) -> BaseCache:
    """Per-base quantities: r_eff(theta0) per matrix and the tall-view Grams ``A^T A``.

    Args:
      base_flat: ``{path: array}`` of theta0 in the Flax layout (stacked blocks).
      unit_list: from :func:`larv_jax.diagnostics.units`.
      mode: ``"exact"`` (SPEC default: eigenvalues of the n x n Gram) or ``"randomized"`` (the
        paper's literal reading; needs ``key``).
      devices, execution: see :func:`diagnose`.
      store: a directory for the on-disk copy (None: none). The file
        ``<store>/<fingerprint>.npz`` is read when present and valid (``source`` is then its
        path) and written (atomically) after computing otherwise; a file that cannot be read is
        recomputed and replaced, with a warning. The fingerprint covers every byte of the
        stacked theta0 matrices, the plan, ``mode`` (and ``k``, ``p``, ``q`` and ``key`` in
        randomized mode), and the larv_jax and jax versions (:func:`base_fingerprint`).
    """
    _check_args(mode, k, p, q)
    if mode == "randomized" and key is None:
        raise ValueError("base_cache(mode='randomized') needs a PRNG key")
    key = jax.random.PRNGKey(0) if key is None else key
    shapes = {p_: np.shape(v) for p_, v in base_flat.items()}
    plan = plan_buckets(unit_list, shapes)
    place = _placement(devices, execution)
    n_dev = _n_dev(place)
    stacks = []
    for bucket in plan:
        lay = _layout(bucket, n_dev)
        parts = []
        for members, wide in ((lay.tall, False), (lay.wide, True)):
            x = np.asarray(_stack(base_flat, bucket, members, len(members), wide, "base"))
            _check_finite(x, [bucket.members[i] for i in members], "base")
            parts.append(x)
        stacks.append(tuple(parts))
    path = None
    if store is not None:
        path = Path(store) / f"{base_fingerprint(plan, stacks, mode, k, p, q, key)}.npz"
        stored = _read_store(path, plan)
        if stored is not None:
            return BaseCache(plan, *stored, mode, tuple(stacks), _Workspace(), str(path))
    reffs, norms, grams = [], [], []
    for bi, (bucket, parts) in enumerate(zip(plan, stacks, strict=True)):
        lay = _layout(bucket, n_dev)
        fn = _base_fn(place.mesh, bucket.square, mode, k, p, q)
        reff, norm, g = _run(fn, [_pad(parts[0], n_dev * lay.ct), _pad(parts[1], n_dev * lay.cw),
                                  _keys(key, bi, lay)], place)
        reffs.append(_from_slots(reff, lay))
        norms.append(_from_slots(norm, lay))
        grams.append(None if g is None else _from_slots(g, lay))
    cache = BaseCache(plan, tuple(reffs), tuple(norms), tuple(grams), mode, tuple(stacks),
                      _Workspace())
    if path is not None and jax.process_index() == 0:
        _write_store(path, cache)
    return cache


STORE_FORMAT = 1  # bump when the cached quantities or their layout change


def base_fingerprint(plan: Sequence[Bucket], stacks: Sequence[tuple[np.ndarray, ...]], mode: str,
                     k: int, p: int, q: int, key: jax.Array) -> str:
    """sha256 (hex) of what the per-base quantities depend on: the plan (shapes, parameter
    paths, blocks, layouts), every byte of the stacked theta0 matrices, ``mode`` (with ``k``,
    ``p``, ``q`` and the key's data in randomized mode), and the larv_jax and jax versions.
    ~0.2 s for the 0.35 GB of ViT-B/32 on one core of the 2-core CPU."""
    from larv_jax import __version__

    h = hashlib.sha256()
    meta = {"format": STORE_FORMAT, "larv_jax": __version__, "jax": jax.__version__,
            "mode": mode,
            "plan": [[list(b.shape), [list(r) for r in b.members]] for b in plan]}
    if mode == "randomized":
        meta.update(k=k, p=p, q=q, key=np.asarray(jax.random.key_data(key)).tolist())
    h.update(json.dumps(meta, sort_keys=True).encode())
    for parts in stacks:
        for x in parts:
            x = np.ascontiguousarray(x, np.float32)
            h.update(repr(x.shape).encode())
            if x.size:
                h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def _read_store(path: Path, plan: Sequence[Bucket]) -> tuple | None:
    """``(reff, norm, gram)`` tuples from ``path``, or None when absent or unusable (warned)."""
    if not path.is_file():
        return None
    try:
        if not zipfile.is_zipfile(path):  # else numpy's message would be about pickles
            raise ValueError("not an .npz file")
        with np.load(path, allow_pickle=False) as z:
            reffs, norms, grams = [], [], []
            for i, b in enumerate(plan):
                n_mat, n = len(b.members), b.shape[1]
                reff, norm = z[f"reff_{i}"], z[f"norm_{i}"]
                gram = None if b.square else z[f"gram_{i}"]
                if (reff.shape != (n_mat,) or norm.shape != (n_mat,)
                        or (gram is not None and gram.shape != (n_mat, n, n))):
                    raise ValueError(f"bucket {i} has the wrong shapes")
                reffs.append(reff)
                norms.append(norm)
                grams.append(gram)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is recomputed
        warnings.warn(f"LARV base cache {path} is unreadable ({err}); recomputing it",
                      stacklevel=3)
        return None
    return tuple(reffs), tuple(norms), tuple(grams)


def _write_store(path: Path, cache: BaseCache) -> None:
    """Write ``cache``'s per-base arrays to ``path`` via a temporary file renamed into place; a
    failure to write (read-only or full disk) is a warning, not an error."""
    arrays = {}
    for i, (reff, norm, gram) in enumerate(zip(cache.reff, cache.norm, cache.gram, strict=True)):
        arrays[f"reff_{i}"], arrays[f"norm_{i}"] = np.asarray(reff), np.asarray(norm)
        if gram is not None:
            arrays[f"gram_{i}"] = np.asarray(gram)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write the LARV base cache {path}: {err}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _pad(x: np.ndarray, n_pad: int) -> np.ndarray:
    if x.shape[0] == n_pad:
        return x
    out = aligned_empty((n_pad,) + x.shape[1:], x.dtype)
    out[x.shape[0]:] = 0
    out[: x.shape[0]] = x
    return out


def diagnose(base_flat: Mapping[str, Any], delta_flat: Mapping[str, Any], *,
             units: Sequence[Unit], key: jax.Array, mode: str = "randomized", k: int = 64,
             p: int = 10, q: int = 2, cache: BaseCache | None = None, eps: float = K.EPS,
             zero_rtol: float = 1e-7, devices: Sequence[jax.Device] | None = None,
             execution: str = "per_device",
             callback: Callable[[int, int, Bucket], None] | None = None) -> Diagnostics:
    """LARV diagnostics (SPEC §2, Eqs. 5-7) of theta0 and the merged update D, per unit.

    Args:
      base_flat / delta_flat: ``{path: array}`` (Flax layout, stacked ``[B, ...]``) of theta0 and
        of the merged delta D (including the merger's own coefficient). Only the units' matrices
        are read; every one must be present in both with the same shape and finite.
      units: the unit list (:func:`larv_jax.diagnostics.units`), fixing L and the depth order.
      key: PRNG key of the randomized SVD (matrix i of bucket b uses ``fold_in(fold_in(key, b),
        i)``, so results do not depend on the device count).
      mode: ``"randomized"`` (default: r_eff(D) by randomized SVD with tail completion) or
        ``"exact"`` (all singular values of D via its n x n Gram). r_eff(theta0) comes from
        ``cache``; without one, an exact :func:`base_cache` is computed first.
      k, p, q: sketch rank, oversampling, power iterations (SPEC: 64, 10, 2).
      eps, zero_rtol: see :func:`larv_jax.diagnostics.kernels.contrast`.
      devices: devices the matrix axis is split over (default: ``jax.local_devices()``;
        ``jax.devices()`` for ``execution="spmd"``).
      execution: ``"per_device"`` (default) or ``"spmd"`` (shard_map over a 1-D mesh); see the
        module docstring.
      callback: called as ``callback(i, n_buckets, bucket)`` after each bucket (progress bars).

    Returns:
      :class:`Diagnostics` with ``e[L]``, ``c[L]`` (means over each unit's matrices; Q/K/V/O
      averaged as in the paper) and the per-matrix values. The commutator is Eq. 6 for square
      matrices and Eq. 7 (through n x n Grams) for rectangular ones.
    """
    _check_args(mode, k, p, q)
    units = list(units)
    shapes = {p_: np.shape(v) for p_, v in base_flat.items()}
    plan = plan_buckets(units, shapes)
    for bucket in plan:
        for ref in bucket.members:
            if ref.path not in delta_flat:
                raise ValueError(f"update: parameter {ref.path!r} is missing")
            if tuple(np.shape(delta_flat[ref.path])) != tuple(shapes[ref.path]):
                raise ValueError(f"parameter {ref.path!r}: base shape {tuple(shapes[ref.path])} "
                                 f"!= update shape {tuple(np.shape(delta_flat[ref.path]))}")
    place = _placement(devices, execution)
    if cache is None:
        cache = base_cache(base_flat, units, devices=devices, execution=execution)
    elif cache.plan != plan:
        raise ValueError("BaseCache was computed for different units or parameter shapes")
    results = []
    n_dev = _n_dev(place)
    ws = cache.workspace
    pooled = ws.lock.acquire(blocking=False)  # else a concurrent call holds it: fresh memory
    try:
        for bi, bucket in enumerate(plan):
            results.append(_diagnose_bucket(bi, bucket, delta_flat, cache, place, n_dev,
                                            ws if pooled else None, key, mode, k, p, q, eps,
                                            zero_rtol))
            if callback is not None:
                callback(bi, len(plan), bucket)
    finally:
        if pooled:
            ws.lock.release()
    return _assemble(units, plan, results, dict(
        mode=mode, base_mode=cache.mode, k=k, p=p, q=q, eps=eps, zero_rtol=zero_rtol,
        devices=place.size, execution=execution,
        buckets=[[len(b.members), *b.shape] for b in plan]))


def _diagnose_bucket(bi: int, bucket: Bucket, delta_flat: Mapping[str, Any], cache: BaseCache,
                     place: _Placement, n_dev: int, ws: _Workspace | None, key: jax.Array,
                     mode: str, k: int, p: int, q: int, eps: float, zero_rtol: float
                     ) -> dict[str, np.ndarray]:
    lay = _layout(bucket, n_dev)
    m, n = bucket.shape

    def staged(name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        return make() if ws is None else ws.get((bi, n_dev, name), make)

    a_t = staged("a_t", lambda: _pad(cache.stack[bi][0], n_dev * lay.ct))
    a_w = staged("a_w", lambda: _pad(cache.stack[bi][1], n_dev * lay.cw))
    d_t = _stack(delta_flat, bucket, lay.tall, n_dev * lay.ct, False, "update",
                 staged("d_t", lambda: aligned_empty((n_dev * lay.ct, m, n))))
    d_w = _stack(delta_flat, bucket, lay.wide, n_dev * lay.cw, True, "update",
                 staged("d_w", lambda: aligned_empty((n_dev * lay.cw, n, m))))
    fn = _diag_fn(place.mesh, bucket.square, mode, k, p, q, float(eps), float(zero_rtol))
    args = [a_t, a_w, d_t, d_w, _keys(key, bi, lay),
            staged("reff", lambda: _to_slots(cache.reff[bi], lay)),
            staged("norm", lambda: _to_slots(cache.norm[bi], lay))]
    if not bucket.square:
        args.append(staged("gram", lambda: _to_slots(cache.gram[bi], lay)))
    out = {name: _from_slots(v, lay) for name, v in _run(fn, args, place).items()}
    if not np.isfinite(out["norm_delta"]).all():  # NaN/Inf reach ||D||_F: name the culprit
        for members, x in ((lay.tall, d_t), (lay.wide, d_w)):
            _check_finite(np.asarray(x), [bucket.members[i] for i in members], "update")
        i = int(np.argmin(np.isfinite(out["norm_delta"])))
        raise ValueError(f"update: the Frobenius norm of {_where(bucket.members[i])} "
                         "overflows float32")
    out["reff_base"] = cache.reff[bi]
    out["norm_base"] = cache.norm[bi]
    return out


def _assemble(units: list[Unit], plan: tuple[Bucket, ...], results: list[dict[str, np.ndarray]],
              settings: dict[str, Any]) -> Diagnostics:
    per_unit: list[list[MatrixDiag]] = [[] for _ in units]
    for bucket, res in zip(plan, results, strict=True):
        m, n = bucket.shape
        for i, ref in enumerate(bucket.members):
            u = units[ref.unit]
            per_unit[ref.unit].append(MatrixDiag(
                u.name, u.depth, ref.path, ref.block, (n, m) if ref.transposed else (m, n),
                *(float(res[f][i]) for f in ("reff_base", "reff_delta", "norm_base",
                                              "norm_delta", "e", "c"))))
    order = {(p, b): j for j, (p, b) in enumerate(pb for u in units for pb in u.matrices)}
    mats = sorted((md for lst in per_unit for md in lst), key=lambda md: order[(md.path, md.block)])
    e = np.array([np.mean([md.e for md in lst]) for lst in per_unit])
    c = np.array([np.mean([md.c for md in lst]) for lst in per_unit])
    settings["granularity"] = _granularity(units)
    return Diagnostics(tuple(units), e, c, tuple(mats), settings)


def _granularity(units: Sequence[Unit]) -> str:
    return "block" if units and units[0].name.startswith("block_") else "module"
