"""Batched, sharded LARV diagnostics: a per-base cache and ``diagnose`` (SPEC §2, Eqs. 5-7).

The units' matrices are grouped into shape buckets (:mod:`larv_jax.diagnostics.buckets`); the
kernels of :mod:`larv_jax.diagnostics.kernels` are vmapped and jit-compiled once per bucket
(``TRACES`` counts the traces) and run on the devices :mod:`larv_jax.diagnostics.devices` places
them on; the per-base quantities can be kept on disk (:mod:`larv_jax.diagnostics.store`).

Multi-host: call ``jax.distributed.initialize()`` on every host, then make the same
``base_cache``/``diagnose`` call with the same inputs on every host (see
:mod:`larv_jax.diagnostics.devices`).
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from larv_jax.arrays import aligned_empty
from larv_jax.diagnostics import kernels as K
from larv_jax.diagnostics.buckets import (
    Bucket,
    MatrixRef,
    _check_finite,
    _from_slots,
    _Layout,
    _layout,
    _pad,
    _stack,
    _to_slots,
    _where,
    plan_buckets,
)
from larv_jax.diagnostics.devices import _compile, _n_dev, _Placement, _placement, _run
from larv_jax.diagnostics.record import Diagnostics, MatrixDiag
from larv_jax.diagnostics.store import base_fingerprint, read_store, write_store
from larv_jax.diagnostics.unit_rules import Unit

__all__ = ["MODES", "TRACES", "BaseCache", "Bucket", "MatrixRef", "base_cache", "base_fingerprint",
           "diagnose", "plan_buckets"]


MODES = ("randomized", "exact")

# Traces of the per-bucket functions (one per compiled bucket shape); tests count them.


TRACES: collections.Counter[str] = collections.Counter()


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


def _check_args(mode: str, k: int, p: int, q: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown diagnostics mode {mode!r}; valid: {list(MODES)}")
    if k < 1 or p < 0 or q < 0:
        raise ValueError(f"randomized SVD needs k >= 1, p >= 0, q >= 0; got k={k}, p={p}, q={q}")


def base_cache(base_flat: Mapping[str, Any], unit_list: Sequence[Unit], *, mode: str = "exact",
               key: jax.Array | None = None, k: int = 64, p: int = 10, q: int = 2,
               devices: Sequence[jax.Device] | None = None,
               execution: str = "auto",
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
        stored = read_store(path, plan)
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
        write_store(path, cache.reff, cache.norm, cache.gram)
    return cache


def diagnose(base_flat: Mapping[str, Any], delta_flat: Mapping[str, Any], *,
             units: Sequence[Unit], key: jax.Array, mode: str = "randomized", k: int = 64,
             p: int = 10, q: int = 2, cache: BaseCache | None = None, eps: float = K.EPS,
             zero_rtol: float = 1e-7, devices: Sequence[jax.Device] | None = None,
             execution: str = "auto",
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
      execution: ``"auto"`` (default: ``"spmd"`` on accelerators, ``"per_device"`` where a
        device is a CPU), ``"per_device"`` or ``"spmd"`` (shard_map over a 1-D mesh); see
        :mod:`larv_jax.diagnostics.devices`.
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
        cache = base_cache(base_flat, units, devices=devices, execution=place.execution)
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
        devices=n_dev, execution=place.execution,
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
    settings["granularity"] = units[0].granularity if units else "module"
    return Diagnostics(tuple(units), e, c, tuple(mats), settings)
