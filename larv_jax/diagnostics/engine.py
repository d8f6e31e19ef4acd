"""Batched, sharded LARV diagnostics: shape buckets, a per-base cache, and ``diagnose``.

Every matrix of every unit is put into a *shape bucket*: matrices are viewed in the torch
orientation ``[out, in]`` and wide ones are transposed to tall (``m >= n``; singular values and
both commutators are invariant under transposing A and D together, which also lets square and
tall dense kernels be read in their stored Flax layout without a transpose copy), so for ViT-B/32 the
buckets are ``[48, 768, 768]`` (q, k, v, out of 12 blocks) and ``[25, 3072, 768]`` (12 fc1, 12 fc2
transposed, the patch conv transposed), plus ``[1, 768, 512]`` for ``visual/proj``. The kernels
of ``larv_jax.diagnostics.kernels`` are vmapped over a bucket and jit-compiled once per bucket
shape (``TRACES`` counts the traces).

Devices: the bucket (matrix) axis is split over ``devices`` (default ``jax.local_devices()``):
the bucket is padded with zero matrices to a multiple of the device count (padding dropped after),
and each device gets one contiguous chunk. Two executions are available (``execution=``):

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
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from larv_jax import tree as ltree
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
    transposed: bool  # the torch-layout matrix was wide and is stored transposed (tall)


class Bucket(NamedTuple):
    """All matrices of one tall shape ``(m, n)``, ``m >= n``, in unit order."""

    shape: tuple[int, int]
    members: tuple[MatrixRef, ...]

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]


def matrix_shape(path: str, shape: Sequence[int]) -> tuple[int, int]:
    """Torch-layout ``(out, in)`` of one matrix of a leaf (block axis dropped)."""
    abstract = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    out = jax.eval_shape(lambda x: ltree.to_matrix(path, x), abstract).shape
    out = out[1:] if ltree.is_stacked(path) else out
    if len(out) != 2:
        raise ValueError(f"{path!r} with shape {tuple(shape)} is not a matrix")
    return int(out[0]), int(out[1])


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
                MatrixRef(i, path, block, m < n))
    return tuple(Bucket(s, tuple(refs)) for s, refs in groups.items())


class BaseCache(NamedTuple):
    """Everything that depends only on theta0, computed once per pretrained model.

    Per bucket (tuples aligned with ``plan``; host numpy arrays, so one cache serves any device
    count): ``reff`` [N] r_eff(theta0) (exact by default), ``norm`` [N] ||theta0||_F, ``gram``
    [N, n, n] = A^T A of the tall view (None for square buckets, whose Eq. 6 commutator does not
    use it). ``plan`` and ``mode`` are static metadata.
    """

    plan: tuple[Bucket, ...]
    reff: tuple[np.ndarray, ...]
    norm: tuple[np.ndarray, ...]
    gram: tuple[np.ndarray | None, ...]
    mode: str


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


def _padded(n: int, place: _Placement) -> int:
    d = place.size
    if place.execution == "per_device":
        d *= jax.process_count()
    return max(1, math.ceil(n / d)) * d


def _process_slice(n_pad: int, place: _Placement) -> slice:
    if place.execution == "spmd" or jax.process_count() == 1:
        return slice(0, n_pad)
    per = n_pad // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def _run(fn: Callable, args: Sequence[Any], place: _Placement) -> Any:
    """Run ``fn`` (vmapped over axis 0 of every arg) on this process's slice; host results."""
    if place.execution == "spmd":
        sharding = NamedSharding(place.mesh, P("b"))
        out = fn(*[jax.device_put(a, sharding) for a in args])
        return jax.tree.map(_fetch, out)
    n_pad = args[0].shape[0]
    sl = _process_slice(n_pad, place)
    chunk = (sl.stop - sl.start) // place.size
    outs = []
    # Accelerators: async dispatch, the devices run concurrently. Host (CPU) "devices" share the
    # same cores, so concurrency buys nothing there, and concurrent LAPACK-backed executables on
    # several fake CPU devices were seen to deadlock (all threads in futex wait) under load:
    # run them one after the other.
    serial = all(d.platform == "cpu" for d in place.devices)
    for i, dev in enumerate(place.devices):
        lo = sl.start + i * chunk
        outs.append(fn(*[jax.device_put(a[lo:lo + chunk], dev) for a in args]))
        if serial:
            jax.block_until_ready(outs[-1])
    local = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), local)
    return local


def _stack(flat: Mapping[str, Any], bucket: Bucket, n_pad: int, what: str) -> np.ndarray:
    """Host-side ``[n_pad, m, n]`` float32 stack of a bucket's (tall) matrices, zero padded.

    Dense kernels are taken in their stored Flax layout ``[in, out]`` (the torch matrix
    transposed) whenever that is already tall or square: e and c are invariant under transposing
    A and D together, and skipping the transpose makes the copy a plain memcpy.
    """
    m, n = bucket.shape
    out = np.zeros((n_pad, m, n), np.float32)
    native: dict[str, np.ndarray] = {}
    for i, ref in enumerate(bucket.members):
        if ref.path not in flat:
            raise ValueError(f"{what}: parameter {ref.path!r} is missing")
        if ref.path not in native:
            leaf = np.asarray(flat[ref.path], np.float32)
            kind = ltree.leaf_kind(ref.path, ltree.unstacked_ndim(ref.path, leaf.shape))
            native[ref.path] = leaf if kind == "dense" else ltree.to_matrix(ref.path, leaf)
        mat = native[ref.path] if ref.block is None else native[ref.path][ref.block]
        out[i] = mat if mat.shape[0] >= mat.shape[1] else mat.T
    return out


def _check_finite(x: np.ndarray, bucket: Bucket, what: str) -> None:
    bad = ~np.isfinite(x[: len(bucket.members)]).all(axis=(1, 2))
    if bad.any():
        ref = bucket.members[int(np.argmax(bad))]
        where = ref.path if ref.block is None else f"{ref.path}[block {ref.block}]"
        raise ValueError(f"{what}: parameter {where} has non-finite values")


def _fetch(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _keys(key: jax.Array, bucket_index: int, n_pad: int) -> jax.Array:
    """Per-matrix raw keys ``fold_in(fold_in(key, bucket), i)``: independent of the padding."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    kb = jax.random.fold_in(key, bucket_index)
    return jax.vmap(jax.random.fold_in, (None, 0))(kb, jnp.arange(n_pad, dtype=jnp.uint32))


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
    def one(a, key):
        g = a.T @ a
        reff = jnp.exp(_entropy(a, g, key, mode, k, p, q))
        return reff, jnp.linalg.norm(a), (None if square else g)

    def local(a, keys):
        TRACES["base"] += 1
        return jax.vmap(one)(a, keys)

    return _compile(local, mesh)


@functools.cache
def _diag_fn(mesh: Mesh | None, square: bool, mode: str, k: int, p: int, q: int, eps: float,
             zero_rtol: float) -> Callable:
    def one(a, d, key, reff_a, norm_a, g_a):
        norm_d = jnp.linalg.norm(d)
        if square:
            c = K.square_commutator(a, d, eps=eps)
            g_d = d.T @ d if mode == "exact" else None
        else:
            g_d = d.T @ d
            c = K.gram_commutator_from_grams(g_a, g_d, a.T @ d, norm_a, norm_d, eps=eps)
        reff_d = jnp.exp(_entropy(d, g_d, key, mode, k, p, q))
        e = K.contrast(reff_a, reff_d, norm_a, norm_d, eps=eps, zero_rtol=zero_rtol)
        return {"e": e, "c": c, "reff_delta": reff_d, "norm_delta": norm_d}

    def local(a, d, keys, reff_a, norm_a, g_a=None):
        TRACES["diagnose"] += 1
        return jax.vmap(one)(a, d, keys, reff_a, norm_a, g_a)

    if square:
        fn = lambda a, d, keys, reff_a, norm_a: local(a, d, keys, reff_a, norm_a)  # noqa: E731
    else:
        fn = local
    return _compile(fn, mesh)


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
               execution: str = "per_device") -> BaseCache:
    """Per-base quantities: r_eff(theta0) per matrix and the tall-view Grams ``A^T A``.

    Args:
      base_flat: ``{path: array}`` of theta0 in the Flax layout (stacked blocks).
      unit_list: from :func:`larv_jax.diagnostics.units`.
      mode: ``"exact"`` (SPEC default: eigenvalues of the n x n Gram) or ``"randomized"`` (the
        paper's literal reading; needs ``key``).
      devices, execution: see :func:`diagnose`.
    """
    _check_args(mode, k, p, q)
    if mode == "randomized" and key is None:
        raise ValueError("base_cache(mode='randomized') needs a PRNG key")
    key = jax.random.PRNGKey(0) if key is None else key
    shapes = {p_: np.shape(v) for p_, v in base_flat.items()}
    plan = plan_buckets(unit_list, shapes)
    place = _placement(devices, execution)
    reffs, norms, grams = [], [], []
    for bi, bucket in enumerate(plan):
        n_real = len(bucket.members)
        n_pad = _padded(n_real, place)
        a = _stack(base_flat, bucket, n_pad, "base")
        _check_finite(a, bucket, "base")
        fn = _base_fn(place.mesh, bucket.square, mode, k, p, q)
        reff, norm, g = _run(fn, [a, np.asarray(_keys(key, bi, n_pad))], place)
        reffs.append(reff[:n_real])
        norms.append(norm[:n_real])
        grams.append(None if g is None else g[:n_real])
    return BaseCache(plan, tuple(reffs), tuple(norms), tuple(grams), mode)


def _pad(x: np.ndarray, n_pad: int) -> np.ndarray:
    if x.shape[0] == n_pad:
        return x
    out = np.zeros((n_pad,) + x.shape[1:], x.dtype)
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
    for bi, bucket in enumerate(plan):
        n_real = len(bucket.members)
        n_pad = _padded(n_real, place)
        a = _stack(base_flat, bucket, n_pad, "base")
        d = _stack(delta_flat, bucket, n_pad, "update")
        _check_finite(d, bucket, "update")
        fn = _diag_fn(place.mesh, bucket.square, mode, k, p, q, float(eps), float(zero_rtol))
        args = [a, d, np.asarray(_keys(key, bi, n_pad)), _pad(cache.reff[bi], n_pad),
                _pad(cache.norm[bi], n_pad)]
        if not bucket.square:
            args.append(_pad(cache.gram[bi], n_pad))
        out = _run(fn, args, place)
        out = {name: v[:n_real] for name, v in out.items()}
        out["reff_base"] = cache.reff[bi]
        out["norm_base"] = cache.norm[bi]
        results.append(out)
        if callback is not None:
            callback(bi, len(plan), bucket)
    return _assemble(units, plan, results, dict(
        mode=mode, base_mode=cache.mode, k=k, p=p, q=q, eps=eps, zero_rtol=zero_rtol,
        devices=place.size, execution=execution,
        buckets=[[len(b.members), *b.shape] for b in plan]))


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
