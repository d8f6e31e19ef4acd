"""Data-free mergers (SPEC §4) as pure functions on task vectors.

Every method has the signature ``method(task_vectors, **hparams) -> delta``:

* ``task_vectors``: a mapping ``{path: tau [K, ...]}`` (task axis first, then the Flax leaf,
  stacked leaves ``[K, B, ...]``), or the same as a nested dict. Any ``Mapping`` works, including
  a lazy one that reads leaves from disk on access (:class:`larv_jax.merging.stream.TaskVectors`):
  every method touches one leaf at a time, which is what makes the streaming engine stream.
* ``delta``: ``{path: D}`` float32 numpy, Flax layout, the same tree structure as the input, and
  INCLUDING the method's own global coefficient, so that ``theta = theta0 + D`` (and LARV's
  ``theta = theta0 + s * D``). For simple averaging ``D = mean_k tau_k``.

Matrix methods (TSV-M, Iso-C, Iso-CTS) apply SPEC's "2-D rule" through
:func:`larv_jax.tree.is_matrix`: Flax dense kernels (transposed to ``[out, in]``) and 2-D embedding
tables take the matrix path; the 4-D patch conv, vectors and any leaf matching a regex of
``exclude`` take the fallback, the mean of ``tau_k``. Stacked leaves ``[B, ...]`` are B independent
matrices. The matrix kernels are float64 numpy (:mod:`larv_jax.merging.linalg` says why).

Presets are ``functools.partial`` of the generalized functions; :data:`METHODS` in
:mod:`larv_jax.merging.registry` is the one registry.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from larv_jax import tree
from larv_jax.arrays import memory_order
from larv_jax.merging import linalg

Flat = dict[str, np.ndarray]

# Iso-C coefficients of the Iso-C paper per backbone (CLIPConfig.name); 1.0 (FusionBench) otherwise.
ISO_C_SCALES = {"ViT-B-32": 1.30, "ViT-B-16": 1.40, "ViT-L-14": 1.50}


# -- helpers ----------------------------------------------------------------------------------
def _flat(task_vectors: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """A flat view of the input and whether it was nested."""
    # Only plain dicts can be nested; other mappings (lazy loaders, views) are flat by contract.
    nested = isinstance(task_vectors, dict) and any(
        isinstance(v, Mapping) for v in task_vectors.values())
    return (tree.flatten(task_vectors) if nested else task_vectors), nested


def _out(delta: Flat, nested: bool) -> Any:
    return tree.unflatten(delta) if nested else delta


def _items(tv: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, tau [K, ...] float32)`` one leaf at a time, K checked."""
    for path in tv:
        t = np.asarray(tv[path], dtype=np.float32)
        if t.ndim == 0 or t.shape[0] < 1:
            raise ValueError(f"task vector {path!r} has shape {t.shape}; expected [K, ...], K >= 1")
        yield path, t


def _scaled(d: np.ndarray, scale: float) -> np.ndarray:
    """``float32(scale) * d`` as float32: the same rounding as
    ``(np.float32(scale) * d).astype(np.float32)``, but in place for a float32 ``d``, so only
    for arrays the method itself just made (never a view of its input)."""
    if d.dtype == np.float32 and d.flags.writeable:
        np.multiply(d, np.float32(scale), out=d)
        return d
    return (np.float32(scale) * d).astype(np.float32)


def _task_sums(tv: Mapping[str, Any], scale: float | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, sum_k tau_k)`` in float64, one leaf at a time, summed in task order (the same
    arithmetic for an in-memory stack and for a streaming loader's ``task_sum``). With ``scale``:
    ``float32(scale * sum)``, the float64 product rounded once (a streaming loader then makes
    no float64 leaf)."""
    task_sum = getattr(tv, "task_sum", None)
    if task_sum is not None:
        for path in tv:
            yield path, (task_sum(path) if scale is None else task_sum(path, scale))
        return
    for path, t in _items(tv):
        m = t.sum(axis=0, dtype=np.float64)
        if scale is not None:
            d = np.empty_like(m, dtype=np.float32)          # keeps m's memory order
            np.multiply(m, scale, out=d, casting="unsafe")
            m = d
        yield path, m


def num_tasks(task_vectors: Mapping[str, Any]) -> int:
    """K, read from the first leaf (``len`` of a lazy mapping's model list when it has one)."""
    k = getattr(task_vectors, "num_tasks", None)
    if k is not None:
        return int(k)
    flat, _ = _flat(task_vectors)
    for path in flat:
        return int(np.shape(flat[path])[0])
    raise ValueError("task_vectors is empty")


def _check_scale(name: str, value: float | None) -> None:
    if value is not None and not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative number; got {value!r}")


def _exclude(exclude: Sequence[str]) -> list[re.Pattern]:
    if isinstance(exclude, str):
        exclude = [exclude]
    return [re.compile(p) for p in exclude]


def takes_matrix_path(path: str, shape: Sequence[int], exclude: Sequence[re.Pattern] = ()) -> bool:
    """The 2-D rule plus the ``exclude`` regexes (``shape`` is the Flax leaf shape, no K axis)."""
    return tree.is_matrix(path, shape) and not any(p.search(path) for p in exclude)


def _single_threaded_blas():
    """BLAS/LAPACK limited to one thread (threadpoolctl, if present).

    Measured on the 2-core CPU: a 768 x 768 float64 ``eigh`` takes 0.055 s with OpenBLAS' 2
    threads on an idle machine but 3.6 s (vs 0.073 s single-threaded) when other processes load
    the cores; so the B matrices of a stacked leaf run as parallel single-threaded jobs instead.
    """
    try:
        import scipy.linalg  # noqa: F401  (load its OpenBLAS before limiting every loaded BLAS)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - both come with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _matrix_map(path: str, taus: np.ndarray, fn: Callable[..., np.ndarray],
                extra: np.ndarray | None = None) -> np.ndarray:
    """Apply ``fn(taus [K, out, in][, extra [out, in]]) -> [out, in]`` to a leaf ``[K, (B,) ...]``
    in Flax layout (``extra``: a leaf without the K axis), each of the B stacked matrices
    independently (in parallel threads, LAPACK single-threaded). Only dense kernels and 2-D
    tables come here, so the matrix views are transposed views, not copies."""
    shape = taus.shape[1:]
    kind = tree.leaf_kind(path, tree.unstacked_ndim(path, shape))
    if kind not in ("dense", "embedding"):
        raise ValueError(f"{path!r} ({kind}) is not a matrix leaf")
    mats = taus.swapaxes(-1, -2) if kind == "dense" else taus           # [K, (B,) out, in]
    ext = None if extra is None else tree.to_matrix(path, extra)        # [(B,) out, in]

    # results go straight into one float32 buffer: no list of float64 blocks, no stack
    out = np.empty(mats.shape[1:], np.float32)                          # [(B,) out, in]

    def one(b):
        if b is None:
            out[...] = fn(mats) if ext is None else fn(mats, ext)
        else:
            out[b] = fn(mats[:, b]) if ext is None else fn(mats[:, b], ext[b])

    with _single_threaded_blas():
        if tree.is_stacked(path):
            workers = max(1, min(os.cpu_count() or 1, mats.shape[1]))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(mats.shape[1])))
        else:
            one(None)
    return np.asarray(tree.from_matrix(path, out, shape), dtype=np.float32)


def _spectral(task_vectors, fn, scale: float, exclude: Sequence[str]) -> Any:
    tv, nested = _flat(task_vectors)
    pats = _exclude(exclude)
    delta: Flat = {}
    for path, t in _items(tv):
        if takes_matrix_path(path, t.shape[1:], pats):
            d = _matrix_map(path, t, fn)
        else:
            d = t.mean(axis=0)
        delta[path] = _scaled(d, scale)
    return _out(delta, nested)


# -- linear -----------------------------------------------------------------------------------
def task_arithmetic(task_vectors: Mapping[str, Any], *, scale: float | None = 0.3) -> Any:
    """Task Arithmetic: ``D = scale * sum_k tau_k`` (default 0.3, FusionBench).

    ``scale=None`` means ``1/K``: the delta of simple averaging, ``theta = mean_k theta_k``.
    """
    _check_scale("scale", scale)
    tv, nested = _flat(task_vectors)
    lam = 1.0 / num_tasks(tv) if scale is None else scale
    # lam * sum in float64, rounded once into the float32 result
    return _out(dict(_task_sums(tv, float(lam))), nested)


simple_average = functools.partial(task_arithmetic, scale=None)
simple_average.__doc__ = "Simple averaging: ``theta = mean_k theta_k``, i.e. ``D = mean_k tau_k``."


# -- TIES -------------------------------------------------------------------------------------
_HIST_BITS = 16
_CHUNK = 1 << 21          # entries per task per chunk: bounds the temporaries of a large leaf


def _chunks(t: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Column slices of ``t`` viewed as ``[K, n]`` in memory order (the entries' order does not
    matter to TIES; a leaf whose last two axes are swapped in memory is not copied)."""
    flat = memory_order(t)[0].reshape(t.shape[0], -1)
    for i in range(0, flat.shape[1], _CHUNK):
        sl = slice(i, min(i + _CHUNK, flat.shape[1]))
        yield sl, flat[:, sl]


def _abs_bits(t: np.ndarray) -> np.ndarray:
    """|t| as uint32 bit patterns (monotone in the value for non-negative floats)."""
    return np.abs(t).view(np.uint32)


def ties_cuts(task_vectors: Mapping[str, Any], *, keep: float = 0.2) -> np.ndarray:
    """Each task's global magnitude cut ``[K]``: the ``(D - floor(keep D))``-th smallest ``|tau_k|``
    over all ``D`` entries of the model (exact, without concatenating the model).

    Pass 1 histograms the top 16 bits of the float32 patterns of ``|tau|`` (65,536 buckets that
    are exact, monotone value ranges); pass 2 gathers only the entries of the bucket holding the
    cut and selects in it. ``keep = 1`` keeps everything (cut 0).
    """
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1]; got {keep!r}")
    tv, _ = _flat(task_vectors)
    counts = None
    for _, t in _items(tv):
        for _, ch in _chunks(t):
            hi = _abs_bits(ch) >> (32 - _HIST_BITS)
            c = np.stack([np.bincount(h, minlength=1 << _HIST_BITS) for h in hi])
            counts = c if counts is None else counts + c
    if counts is None:
        raise ValueError("task_vectors is empty")
    d = int(counts[0].sum())
    rank = d - int(d * keep)                                 # 1-based rank of the cut
    k_tasks = counts.shape[0]
    if rank <= 0:
        return np.zeros(k_tasks, np.float32)
    cum = np.cumsum(counts, axis=1)
    buckets = np.array([np.searchsorted(cum[k], rank) for k in range(k_tasks)])
    below = np.array([cum[k, b - 1] if b > 0 else 0 for k, b in enumerate(buckets)])
    gathered: list[list[np.ndarray]] = [[] for _ in range(k_tasks)]
    for _, t in _items(tv):
        for _, ch in _chunks(t):
            bits = _abs_bits(ch)
            hi = bits >> (32 - _HIST_BITS)
            for k in range(k_tasks):
                sel = bits[k][hi[k] == buckets[k]]
                if sel.size:
                    gathered[k].append(sel)
    cuts = np.empty(k_tasks, np.float32)
    for k in range(k_tasks):
        vals = np.concatenate(gathered[k]).view(np.float32)
        j = rank - below[k] - 1
        cuts[k] = np.partition(vals, j)[j]
    return cuts


def ties(task_vectors: Mapping[str, Any], *, scale: float = 0.3, keep: float = 0.2,
         aggregate: str = "sum", cuts: Sequence[float] | None = None) -> Any:
    """TIES merging (trim, elect sign, disjoint merge) over the whole model.

    Trim: keep ``|tau_k| >= cut_k`` with ``cut_k`` the task's global cut (:func:`ties_cuts`; this
    keeps ``floor(keep D) + 1`` entries plus ties). Elect: ``s = sign(sum_k trimmed_k)``; where
    that sum is exactly 0, ``s`` = the sign of the sum of all elected signs of the model.
    Disjoint merge: entries whose sign strictly agrees with ``s``, aggregated by ``"sum"``
    (FusionBench default, ``scale`` 0.3) or ``"mean"`` (sum / max(1, count); the paper, preset
    :data:`ties_paper` with ``scale`` 1). ``cuts`` may be given to skip the selection passes.
    Streaming: 2 passes for the cuts, 1 merge pass; exact-cancellation entries are fixed up at
    the end once the model-wide majority sign is known.
    """
    _check_scale("scale", scale)
    if aggregate not in ("sum", "mean"):
        raise ValueError(f"aggregate must be 'sum' or 'mean'; got {aggregate!r}")
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1]; got {keep!r}")
    tv, nested = _flat(task_vectors)
    cuts = ties_cuts(tv, keep=keep) if cuts is None else np.asarray(cuts, np.float32)
    delta: Flat = {}
    fixups = []
    elected = 0
    for path, t in _items(tv):
        if len(cuts) != t.shape[0]:
            raise ValueError(f"cuts has {len(cuts)} entries for K = {t.shape[0]} tasks")
        mem, swapped = memory_order(t)
        merged_mem = np.empty(mem.shape[1:], np.float32)   # same memory order as the chunks
        merged = merged_mem.swapaxes(-1, -2) if swapped else merged_mem
        out = merged_mem.reshape(-1)
        for sl, ch in _chunks(t):
            m, e, tied = _ties_chunk(ch, cuts, aggregate)
            out[sl] = m
            elected += e
            if tied[0].size:
                fixups.append((out, tied[0] + sl.start, tied[1], tied[2]))
        delta[path] = merged
    majority = np.sign(elected)
    for flat_out, idx, p, n in fixups:
        if majority != 0:
            flat_out[idx] = p if majority > 0 else n
    for path in delta:
        delta[path] = _scaled(delta[path], scale)
    return _out(delta, nested)


def _ties_chunk(t: np.ndarray, cuts: np.ndarray, aggregate: str):
    """Trim / elect / disjoint-merge one chunk ``[K, n]``: merged ``[n]``, the sum of its elected
    signs, and its exact-cancellation entries ``(index, value if s=+1, value if s=-1)``."""
    trimmed = np.where(np.abs(t) >= cuts[:, None], t, np.float32(0))
    pos = np.where(trimmed > 0, trimmed, np.float32(0))
    neg = trimmed - pos
    sign = np.sign(trimmed.sum(axis=0))
    pos_s, neg_s = pos.sum(axis=0), neg.sum(axis=0)
    if aggregate == "mean":
        pos_s = pos_s / np.maximum(1, (trimmed > 0).sum(axis=0)).astype(np.float32)
        neg_s = neg_s / np.maximum(1, (trimmed < 0).sum(axis=0)).astype(np.float32)
    merged = np.where(sign > 0, pos_s, np.where(sign < 0, neg_s, np.float32(0)))
    tied = np.flatnonzero((sign == 0) & ((pos_s != 0) | (neg_s != 0)))
    return merged, int(sign.sum(dtype=np.int64)), (tied, pos_s[tied], neg_s[tied])


ties_paper = functools.partial(ties, scale=1.0, aggregate="mean")
ties_paper.__doc__ = "TIES as in the paper: disjoint MEAN, ``scale`` 1 (see :func:`ties`)."


# -- DARE -------------------------------------------------------------------------------------
class DareTaskVectors(Mapping):
    """Lazy view of DARE-processed task vectors: ``tau * mask / (1 - p)``, ``mask ~ Bernoulli(1-p)``.

    The mask of a leaf depends only on ``(key, path, task)`` (``fold_in(key, crc32(path))`` then
    ``fold_in(., k)``), so repeated reads (TIES' passes) and any leaf order give the same masks.
    ``masks`` (``{path: bool [K, ...]}``, True = keep) replace the random ones where given.
    """

    def __init__(self, task_vectors: Mapping[str, Any], *, p: float, key: Any,
                 masks: Mapping[str, Any] | None = None):
        self.tv = task_vectors
        self.p = float(p)
        self.key = key
        self.masks = masks or {}
        self.num_tasks = getattr(task_vectors, "num_tasks", None)

    def __iter__(self):
        return iter(self.tv)

    def __len__(self):
        return len(self.tv)

    def mask(self, path: str, shape: Sequence[int]) -> np.ndarray:
        if path in self.masks:
            m = np.asarray(self.masks[path], dtype=bool)
            if m.shape != tuple(shape):
                raise ValueError(f"DARE mask for {path!r} has shape {m.shape}; expected {tuple(shape)}")
            return m
        return np.stack([self.mask_task(path, shape[1:], k) for k in range(shape[0])])

    def mask_task(self, path: str, shape: Sequence[int], k: int) -> np.ndarray:
        """The random keep-mask of task ``k`` for one leaf of Flax ``shape``."""
        import jax

        leaf_key = jax.random.fold_in(self.key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        return np.asarray(jax.random.bernoulli(jax.random.fold_in(leaf_key, k), 1.0 - self.p,
                                               tuple(shape)))

    def __getitem__(self, path: str) -> np.ndarray:
        src = self.tv[path]
        # A loader that hands out fresh arrays (``fresh``) lets us work in place: one copy less
        # of the largest leaf ([K, B, 3072, 768]).
        t = np.asarray(src, dtype=np.float32) if getattr(self.tv, "fresh", False) else np.array(
            src, dtype=np.float32)
        if self.p == 0.0 and path not in self.masks:
            return t
        m = self.mask(path, t.shape) if path in self.masks else None
        for k in range(t.shape[0]):
            mk = m[k] if m is not None else self.mask_task(path, t.shape[1:], k)
            np.divide(t[k], np.float32(1.0 - self.p), out=t[k])
            t[k][~mk] = 0
        return t


def _as_key(key: Any):
    import jax

    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def dare(task_vectors: Mapping[str, Any], *, p: float = 0.5, key: Any = 0,
         masks: Mapping[str, Any] | None = None, then: str = "task_arithmetic",
         **then_kwargs: Any) -> Any:
    """DARE (drop and rescale) on every entry of every task vector, then another merger.

    Each entry is kept with probability ``1 - p`` and rescaled by ``1/(1 - p)`` (``p`` 0.5).
    ``key`` is a JAX PRNG key or an int seed; ``masks`` ``{path: bool [K, ...]}`` (True = keep)
    override the random draw for those leaves, for exact comparison with other implementations.
    ``then`` names the merger that follows (``task_arithmetic``, ``ties`` or ``simple_average``);
    ``then_kwargs`` go to it. Presets: :data:`dare_task_arithmetic` (TA, scale 0.3),
    :data:`dare_ties` (TIES, scale 0.5, keep 0.2, sum), :data:`dare_average` (scale 1/K).
    """
    if not (0.0 <= p < 1.0):
        raise ValueError(f"p (DARE drop rate) must be in [0, 1); got {p!r}")
    nexts = {"task_arithmetic": task_arithmetic, "ties": ties, "simple_average": simple_average}
    if then not in nexts:
        raise ValueError(f"then must be one of {sorted(nexts)}; got {then!r}")
    # unknown options of `then` are caught by larv_jax.merging.registry.hparams (and by Python)
    tv, nested = _flat(task_vectors)
    flat_masks = tree.flatten(masks) if masks and any(
        isinstance(v, Mapping) for v in masks.values()) else masks
    view = DareTaskVectors(tv, p=p, key=_as_key(key), masks=flat_masks)
    return _out(nexts[then](view, **then_kwargs), nested)


dare_task_arithmetic = functools.partial(dare, then="task_arithmetic", scale=0.3)
dare_ties = functools.partial(dare, then="ties", scale=0.5, keep=0.2, aggregate="sum")
dare_average = functools.partial(dare, then="simple_average")


# -- spectral ---------------------------------------------------------------------------------
def tsv_m(task_vectors: Mapping[str, Any], *, scale: float = 1.0,
          exclude: Sequence[str] = ()) -> Any:
    """Task Singular Vectors merging (TSV-M), times ``scale`` (alpha, default 1).

    Per matrix ``[out, in]`` (r = min side): each task's top ``floor(r/K)`` singular triplets,
    concatenated in task order; ``U_bar`` and ``V_bar`` replaced by their polar factors;
    ``D = U_perp diag(sigma_bar) V_perp^T``. Fallback leaves: mean of ``tau_k``.
    """
    _check_scale("scale", scale)
    return _spectral(task_vectors, linalg.tsv_m_matrix, scale, exclude)


def iso_c(task_vectors: Mapping[str, Any], *, scale: float | None = None, model: str | None = None,
          exclude: Sequence[str] = ()) -> Any:
    """Iso-C: per matrix ``M = sum_k tau_k = U S V^T`` -> ``mean(S) U V^T``; times ``scale``.

    ``scale=None`` picks the Iso-C paper's value for ``model`` (a ``CLIPConfig.name``): 1.30
    ViT-B-32, 1.40 ViT-B-16, 1.50 ViT-L-14, and FusionBench's 1.0 for any other model or None.
    Fallback leaves: mean of ``tau_k`` (times ``scale`` too).
    """
    _check_scale("scale", scale)
    lam = ISO_C_SCALES.get(model, 1.0) if scale is None else scale
    tv, nested = _flat(task_vectors)
    # Only sum_k tau_k is needed (float64): a streaming loader never builds the [K, ...] stack.
    pats, k, delta = _exclude(exclude), num_tasks(tv), {}
    for path, m in _task_sums(tv):
        if takes_matrix_path(path, m.shape, pats):
            d = _matrix_map(path, m[None], linalg.iso_c_matrix)   # one "task": the sum itself
        else:
            d = m / k
        delta[path] = _scaled(d, lam)
    return _out(delta, nested)


def iso_cts(task_vectors: Mapping[str, Any], *, scale: float = 1.5, common_fraction: float = 0.8,
            exclude: Sequence[str] = ()) -> Any:
    """Iso-CTS (common and task-specific subspaces), times ``scale`` (paper 1.5).

    Per matrix (r = min side): ``c0 = floor(r f)``, ``s = round((r - c0)/K) K`` (Python round),
    ``c = r - s``, ``d = s / K`` (:func:`larv_jax.merging.linalg.iso_cts_sizes`). Common block: top
    ``c`` triplets of ``sum_k tau_k``; task block k: top ``d`` triplets of
    ``tau_k - U_c U_c^T tau_k``. Both concatenated bases replaced by their polar factors, every
    singular value set to the mean of the concatenated ones. Fallback leaves: mean of ``tau_k``.
    """
    _check_scale("scale", scale)
    if not (0.0 <= common_fraction <= 1.0):
        raise ValueError(f"common_fraction must be in [0, 1]; got {common_fraction!r}")
    fn = functools.partial(linalg.iso_cts_matrix, common_fraction=common_fraction)
    return _spectral(task_vectors, fn, scale, exclude)
