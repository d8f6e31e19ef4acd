"""Streaming merge engine: the registry's pure functions run over checkpoints on disk.

Nothing here holds K models: :class:`TaskVectors` is a lazy ``{path: tau [K, ...]}`` mapping that
reads one Flax leaf of each checkpoint on access (``ckpt.leaf(path)``), subtracts the base leaf and
hands the ``[K, ...]`` block to the method, which touches one leaf at a time (TIES makes three
such passes: histogram, bucket gather, merge). Resident memory is therefore about one merged model
(the delta) plus K copies of the largest leaf.

The LARV veneer hooks in between the two steps of :func:`merge_checkpoints`:

    result = merge_delta(base, models, "ties")            # delta D (coefficient included) + report
    scales = ...                                          # per-leaf s (scalar, or [B] per block)
    params = apply_delta(base, result.delta, scales=scales)   # theta0 + s * D
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.metadata
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from larv_jax import tree
from larv_jax.arrays import empty_like_order

Flat = dict[str, np.ndarray]


class MergeResult(NamedTuple):
    delta: Flat          # {path: D}, Flax layout, float32; only leaves the models carry
    report: dict         # JSON-serialisable: method, hparams, inputs, versions, timings


def _open(ckpt: Any):
    if isinstance(ckpt, (str, Path)):
        from larv_jax.checkpoint import load_checkpoint

        return load_checkpoint(ckpt)
    return ckpt


def _name(ckpt: Any) -> str:
    return str(getattr(ckpt, "origin", ckpt))


class TaskVectors(Mapping):
    """Lazy ``{path: tau [K, ...]}``: ``tau_k = model_k.leaf(path) - base.leaf(path)``, float32.

    Checks on first read of each leaf: same shape as the base, all finite (a ValueError naming the
    file and the key otherwise). Returned arrays are the consumer's (``fresh = True``): it may
    modify them in place.

    ``reuse_buffers=True`` hands out views of one buffer (grown to the largest leaf) for every
    leaf, so an array is only valid until the next read. This is for consumers
    that touch one leaf at a time (every registry method and SVC, as :func:`merge_delta` runs
    them): a fresh 0.9 GB ``[8, 12, 768, 3072]`` block per leaf otherwise spends more time in the
    kernel zeroing new pages than in reading the files (measured on the 2-core VM).
    """

    fresh = True

    def __init__(self, base: Any, models: Sequence[Any], paths: Sequence[str], *,
                 reuse_buffers: bool = False):
        if not models:
            raise ValueError("no fine-tuned models given (models is empty)")
        self.base = base
        self.models = list(models)
        self.paths = list(paths)
        self._pos = {p: i for i, p in enumerate(self.paths)}
        self.num_tasks = len(self.models)
        self.read_s = 0.0
        self._checked: set[str] = set()
        self.reuse_buffers = reuse_buffers
        self._pools = {"stack": np.empty(0, np.float32), "sum": np.empty(0, np.float32)}
        self._ahead: tuple[str, concurrent.futures.Future] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: object) -> bool:
        return path in self._pos

    def _buffer(self, name: str, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        """A float32 ``shape`` array in ``like``'s memory order: from the named reused pool
        (grown as needed) with ``reuse_buffers``, else fresh."""
        if not self.reuse_buffers:
            return empty_like_order(shape, like)
        size = int(np.prod(shape, dtype=np.int64))
        if self._pools[name].size < size:
            self._pools[name] = np.empty(size, np.float32)
        return empty_like_order(shape, like, pool=self._pools[name])

    def _taus(self, path: str, dest) -> Iterator[int]:
        """Write ``tau_k`` of one leaf into ``dest(k)`` for each task, yielding ``k`` after each.

        The base leaf is read in the source's memory order (``native``: [out, in] for HF
        kernels) and ``dest`` takes that order too, so every read is a plain copy and the merged
        delta keeps it. Shapes are checked and, on a leaf's first read, values are finite.
        """
        t0 = time.perf_counter()
        check = path not in self._checked
        b = _read(self.base, path, check, native=True)
        for k, m in enumerate(self.models):
            shape_k = tuple(m.shape(path)) if hasattr(m, "shape") else b.shape
            if shape_k != b.shape:
                raise ValueError(f"{_name(m)}: {path!r} has shape {shape_k}; the base "
                                 f"{_name(self.base)} has {b.shape}")
            out = dest(k, b)
            _read(m, path, check, out=out)   # straight into place: no per-model copy
            np.subtract(out, b, out=out)
            yield k
        self._checked.add(path)
        self.read_s += time.perf_counter() - t0

    def __getitem__(self, path: str) -> np.ndarray:
        stack: list[np.ndarray] = []

        def dest(k, b):
            if not stack:
                stack.append(self._buffer("stack", (self.num_tasks, *b.shape), b))
            return stack[0][k]

        for _ in self._taus(path, dest):
            pass
        return stack[0]

    def task_sum(self, path: str) -> np.ndarray:
        """``sum_k tau_k`` of one leaf, float64, in the base leaf's memory order.

        For the methods that only need the sum (Task Arithmetic, simple averaging, Iso-C): one
        model leaf at a time goes through a scratch buffer into a float64 accumulator, so no
        ``[K, ...]`` stack is built. When the methods walk the leaves in order, the next leaf's
        sum is read in a background thread while the caller works on this one (reading and
        numpy's kernels release the GIL); at most two sums are alive, and only one is being
        read at any time (so the scratch buffer is never shared).
        """
        if self._ahead is not None and self._ahead[0] == path:
            result = self._ahead[1].result()
            self._ahead = None
        else:
            if self._ahead is not None:       # out of order: let the read-ahead finish first
                concurrent.futures.wait([self._ahead[1]])
                self._ahead = None
            result = self._task_sum(path)
        i = self._pos.get(path)
        if i is not None and i + 1 < len(self.paths):
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="larv-read-ahead")
            nxt = self.paths[i + 1]
            self._ahead = (nxt, self._executor.submit(self._task_sum, nxt))
        return result

    def _task_sum(self, path: str) -> np.ndarray:
        scratch: list[np.ndarray] = []

        def dest(k, b):
            if not scratch:
                scratch.append(self._buffer("sum", b.shape, b))
                # fresh: the caller keeps it (reused accumulators measured slower)
                scratch.append(empty_like_order(b.shape, b, np.float64))
            return scratch[0]

        for k in self._taus(path, dest):
            buf, acc = scratch
            if k == 0:
                np.copyto(acc, buf)
            else:
                np.add(acc, buf, out=acc)
        return scratch[1]

    def close(self) -> None:
        """Stop the read-ahead thread (also done when the object is collected)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._ahead = None

    def __del__(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)

    @property
    def buffers(self) -> list[np.ndarray]:
        """The reused memory (empty unless ``reuse_buffers``)."""
        return [p for p in self._pools.values() if p.size]


def _read(ckpt: Any, path: str, check: bool, out: np.ndarray | None = None,
          native: bool = False) -> np.ndarray:
    if _takes_out(type(ckpt)):
        x = ckpt.leaf(path, out=out, native=native)
    else:
        x = np.asarray(ckpt.leaf(path), dtype=np.float32)
        if out is not None:
            if x.shape != out.shape:
                raise ValueError(f"{_name(ckpt)}: {path!r} has shape {x.shape}; expected "
                                 f"{out.shape}")
            out[...] = x
            x = out
    # A float64 sum of float32 values cannot overflow, so it is finite iff every value is: one
    # pass without a boolean temporary; the count only when something is wrong.
    if check and not np.isfinite(np.sum(x, dtype=np.float64)):
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise ValueError(f"{_name(ckpt)}: {path!r} has {bad} NaN/Inf value(s)")
    return x


@functools.lru_cache(maxsize=64)
def _takes_out(cls: type) -> bool:
    """Whether ``cls.leaf`` takes ``out=`` and ``native=`` (``larv_jax.checkpoint``'s does);
    looked up once per checkpoint class, not per read."""
    try:
        params = inspect.signature(cls.leaf).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "out" in params and "native" in params


def _validate(base: Any, models: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(paths merged, paths copied from the base); ValueError naming the file and key otherwise."""
    if not models:
        raise ValueError("no fine-tuned models given (models is empty)")
    base_paths = list(base.paths())
    first = list(models[0].paths())
    first_set = set(first)
    for m in models[1:]:
        ps = set(m.paths())
        if ps != first_set:
            extra = sorted(ps - first_set)
            lack = sorted(first_set - ps)
            key = extra[0] if extra else lack[0]
            what = "has" if extra else "lacks"
            raise ValueError(f"{_name(m)}: {what} parameter {key!r} (compared with "
                             f"{_name(models[0])}); fine-tuned checkpoints must have the same keys")
    unknown = sorted(first_set - set(base_paths))
    if unknown:
        raise ValueError(f"{_name(models[0])}: parameter {unknown[0]!r} is not in the base "
                         f"{_name(base)}")
    for p in first:
        want = tuple(base.shape(p))
        for m in models:
            got = tuple(m.shape(p))
            if got != want:
                raise ValueError(f"{_name(m)}: {p!r} has shape {got}; the base {_name(base)} "
                                 f"has {want}")
    merged = [p for p in base_paths if p in first_set]
    copied = [p for p in base_paths if p not in first_set]
    return merged, copied


def resolve_hparams(method: str, hparams: Mapping[str, Any], *,
                    model: str | None = None) -> dict[str, Any]:
    """Every keyword of ``METHODS[method]`` with its value (given, else the preset's default).

    Unknown keywords raise a ValueError naming them; ``model`` fills Iso-C's ``model`` argument.
    """
    from larv_jax.merging import get_method

    fn = get_method(method)
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if p.kind == p.KEYWORD_ONLY}
    extra_ok = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    unknown = sorted(set(hparams) - set(params))
    if unknown and not extra_ok:
        raise ValueError(f"{method}: unknown hyperparameter(s) {unknown}; valid: {sorted(params)}")
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(getattr(fn, "keywords", {}))           # preset keywords beyond the signature
    if "model" in params and model is not None:
        out["model"] = model
    out.update(hparams)
    if "then" in out:                                 # DARE: the following merger's defaults too
        then = inspect.signature(get_method(out["then"])).parameters
        for n, p in then.items():
            if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty:
                out.setdefault(n, p.default)
    if method == "iso_c" and out.get("scale") is None:
        from larv_jax.merging.methods import ISO_C_SCALES

        out["scale"] = ISO_C_SCALES.get(out.get("model"), 1.0)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return f"<{len(v)} entries>"
    return repr(v)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("larv_jax", "jax", "jaxlib", "flax", "numpy", "scipy", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _describe(ckpt: Any, hash_inputs: bool) -> dict[str, Any]:
    from larv_jax.io import sha256_file

    files = [Path(f) for f in getattr(ckpt, "files", [])]
    return {"path": _name(ckpt), "source_dtype": str(getattr(ckpt, "source_dtype", "float32")),
            "files": [{"file": str(f), "sha256": sha256_file(f) if hash_inputs else None}
                      for f in files]}


def merge_delta(base: Any, models: Sequence[Any], method: str, *, svc: bool = False,
                svc_alpha: float | None = None, hash_inputs: bool = True,
                **hparams: Any) -> MergeResult:
    """Merge fine-tuned checkpoints into a delta, streaming leaf by leaf.

    ``base`` / ``models``: paths (opened with :func:`larv_jax.checkpoint.load_checkpoint`) or
    opened checkpoints (anything with ``paths()``, ``shape(path)``, ``leaf(path)``). ``method`` is a
    :data:`larv_jax.merging.METHODS` name; ``hparams`` override its defaults. With ``svc`` the
    delta is post-processed by :func:`larv_jax.merging.svc` (``svc_alpha`` defaults to the
    method's value, :data:`larv_jax.merging.SVC_ALPHA`).

    Returns ``MergeResult(delta, report)``: ``delta`` ``{path: D}`` (float32, Flax layout, the
    method's coefficient included) for every leaf the fine-tuned models carry; base leaves they
    lack (e.g. the text tower when the models are ``CLIPVisionModel``) are listed in
    ``report["copied_from_base"]`` and have no delta. Float16 / bfloat16 inputs are read as
    float32 (``report["upcast"]``).
    """
    from larv_jax.merging import get_method
    from larv_jax.merging import svc as svc_fn
    from larv_jax.merging import svc_alpha as default_alpha

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fn = get_method(method)
    base = _open(base)
    models = [_open(m) for m in models]
    merged_paths, copied = _validate(base, models)
    config = getattr(base, "config", None)
    hp = resolve_hparams(method, hparams, model=getattr(config, "name", None))
    alpha = None
    if svc:
        alpha = default_alpha(method) if svc_alpha is None else float(svc_alpha)
    elif svc_alpha is not None:
        raise ValueError("svc_alpha is given but svc is False")
    timings["open_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = {"base": _describe(base, hash_inputs),
              "models": [_describe(m, hash_inputs) for m in models]}
    timings["hash_s"] = time.perf_counter() - t0

    tv = TaskVectors(base, models, merged_paths, reuse_buffers=True)
    t0 = time.perf_counter()
    delta = _detached(fn(tv, **hp), tv)
    timings["merge_s"] = time.perf_counter() - t0
    tv.close()
    if svc:
        t0 = time.perf_counter()
        delta = _detached(svc_fn(delta, tv, alpha=alpha, exclude=hp.get("exclude", ()),
                                 inplace=True), tv)
        timings["svc_s"] = time.perf_counter() - t0
    timings["read_s"] = tv.read_s

    upcast = [d["path"] for d in [inputs["base"], *inputs["models"]]
              if d["source_dtype"] not in ("float32",)]
    report = {
        "method": method,
        "hparams": {k: _jsonable(v) for k, v in hp.items()},
        "svc": {"alpha": alpha} if svc else None,
        "num_tasks": len(models),
        "inputs": inputs,
        "upcast_to_float32": upcast,
        "merged_leaves": len(merged_paths),
        "merged_params": int(sum(int(np.prod(base.shape(p))) for p in merged_paths)),
        "copied_from_base": copied,
        "config": getattr(config, "name", None),
        "versions": _versions(),
        "timings": timings,
    }
    return MergeResult(delta, report)


def _detached(delta: Flat, tv: TaskVectors) -> Flat:
    """``delta`` with any leaf that views one of ``tv``'s reused buffers copied out (no registry
    method returns such a view; this keeps a future one from being overwritten silently)."""
    for path, d in delta.items():
        if any(np.may_share_memory(d, b) for b in tv.buffers):
            delta[path] = np.array(d)
    return delta


def _scale_for(scales: Any, path: str, shape: Sequence[int]) -> Any:
    if scales is None:
        return None
    s = scales(path) if callable(scales) else scales.get(path, None)
    if s is None:
        return None
    s = np.asarray(s, dtype=np.float32)
    if s.ndim == 1 and tree.is_stacked(path) and s.shape[0] == shape[0]:
        return s.reshape((-1,) + (1,) * (len(shape) - 1))
    if s.ndim != 0:
        raise ValueError(f"scale for {path!r} has shape {s.shape}; expected a scalar or "
                         f"[{shape[0]}] per block of a stacked leaf")
    return s


def apply_delta(base: Any, delta: Mapping[str, np.ndarray], *,
                scales: Mapping[str, Any] | Callable[[str], Any] | None = None,
                consume: bool = False, inplace: bool = False) -> Flat:
    """``theta = theta0 + s * D`` for every leaf of the base (``s = 1`` where ``scales`` gives
    none; leaves without a delta are the base's, unchanged).

    ``base``: an opened checkpoint, a path, or a flat ``{path: array}``. ``scales``: ``{path: s}``
    or ``s(path)``; ``s`` is a scalar or, for stacked leaves, one value per block ``[B]``. With
    ``consume`` the entries of ``delta`` (a dict) are released as they are used; with
    ``inplace`` as well (float32 delta arrays nobody else holds, as :func:`merge_delta` returns),
    each ``theta`` is computed in its delta's memory (no second model-sized allocation).
    """
    if inplace and not consume:
        raise ValueError("apply_delta(inplace=True) needs consume=True")
    if isinstance(base, Mapping):
        paths = list(base)
        get = lambda p: np.array(base[p], dtype=np.float32)  # noqa: E731  (a copy: ours to add to)
    else:
        base = _open(base)
        paths = list(base.paths())
        leaf = functools.partial(base.leaf, native=True) if _takes_out(type(base)) else base.leaf
        get = lambda p: np.asarray(leaf(p), dtype=np.float32)  # noqa: E731  (fresh)
    unknown = sorted(set(delta) - set(paths))
    if unknown:
        raise ValueError(f"delta has leaves the base lacks: {unknown[:5]}")
    out: Flat = {}
    for p in paths:
        if inplace and p in delta and isinstance(delta[p], np.ndarray) \
                and delta[p].dtype == np.float32 and delta[p].flags.writeable:
            d = delta.pop(p)
            s = _scale_for(scales, p, d.shape)
            if s is not None:
                d *= s
            d += get(p)
            out[p] = d
            continue
        theta = get(p)  # keeps the leaf's memory order
        if p in delta:
            d = delta.pop(p) if consume else delta[p]
            s = _scale_for(scales, p, theta.shape)
            theta += d if s is None else s * d
        out[p] = theta
    return out


def merge_checkpoints(base: Any, models: Sequence[Any], method: str, *,
                      scales: Mapping[str, Any] | Callable[[str], Any] | None = None,
                      **kwargs: Any) -> tuple[Flat, dict]:
    """:func:`merge_delta` then :func:`apply_delta`: ``(merged flat params, report)``.

    ``kwargs`` are those of :func:`merge_delta` (``svc``, ``svc_alpha``, ``hash_inputs``, method
    hyperparameters); ``scales`` those of :func:`apply_delta` (the LARV veneer's per-leaf ``s``).
    """
    base = _open(base)
    delta, report = merge_delta(base, models, method, **kwargs)
    t0 = time.perf_counter()
    params = apply_delta(base, delta, scales=scales, consume=True, inplace=True)
    report["timings"]["apply_s"] = time.perf_counter() - t0
    report["scaled"] = scales is not None
    return params, report
