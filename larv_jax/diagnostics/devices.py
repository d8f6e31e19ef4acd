"""Where the diagnostics run: device placement and execution of one bucket's kernel.

The bucket (matrix) axis is split over ``devices`` (default ``jax.local_devices()``). Two
executions are available (``execution=``), and ``"auto"`` (the default) picks one:
``"spmd"`` when every device it would run on is an accelerator (GPU, TPU), ``"per_device"`` when
any is a CPU (:func:`resolve_execution`).

- ``"per_device"`` (the CPU default): the jitted, vmapped kernel is dispatched once per device on its
  chunk (``jax.device_put(chunk, device)``); one trace per bucket shape (XLA compiles it once
  per device). Accelerators run concurrently (async dispatch); CPU devices, which share the host
  cores anyway, run one after another. No communication is needed.
- ``"spmd"``: one ``jax.jit(jax.shard_map(...))`` over a 1-D ``Mesh(devices, ("b",))`` with inputs
  placed by ``NamedSharding(mesh, P("b"))`` (the accelerator default: one program, one launch
  per bucket, the devices run it together). Same numbers. NOT the CPU default because on this
  jaxlib (0.10.2, XLA:CPU, 2 fake devices on 2 cores) SPMD programs that mix LAPACK custom calls
  (Cholesky, eigvalsh, sytrd) intermittently hung (all threads idle, one device's execution never
  completing), both with shard_map and with jit + NamedSharding; concurrent per-device
  dispatch hung too, rarely; sequential per-device dispatch on CPU has not.

Multi-host: with ``per_device`` each process takes the contiguous slice ``process_index`` of
every bucket, runs it on its local devices and the slices are exchanged with
``multihost_utils.process_allgather``; with ``spmd`` pass ``devices=jax.devices()`` (the global
list) and the mesh spans all hosts. Both are exercised with two local CPU processes
(``jax.distributed.initialize`` on a localhost coordinator, gloo collectives) in
``tests/test_diagnostics_multihost.py``: bit-identical to one process with two devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

EXECUTIONS = ("auto", "per_device", "spmd")


def resolve_execution(execution: str, devices: Sequence[jax.Device] | None = None) -> str:
    """``"auto"`` -> ``"spmd"`` when every device the diagnostics would use (``devices``, else
    ``jax.devices()``) is an accelerator, ``"per_device"`` when any is a CPU; the other names
    are returned as they are (ValueError for an unknown one)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"unknown execution {execution!r}; valid: {list(EXECUTIONS)}")
    if execution != "auto":
        return execution
    devs = tuple(devices) if devices is not None else tuple(jax.devices())
    return "per_device" if any(d.platform == "cpu" for d in devs) else "spmd"


class _Placement(NamedTuple):
    """Where a bucket runs: local ``devices``; this process's slice of every bucket."""

    devices: tuple[jax.Device, ...]
    execution: str
    mesh: Mesh | None

    @property
    def size(self) -> int:
        return len(self.devices)


def _placement(devices: Sequence[jax.Device] | None, execution: str) -> _Placement:
    execution = resolve_execution(execution, devices)
    if execution == "spmd":
        devs = tuple(devices) if devices is not None else tuple(jax.devices())
        return _Placement(devs, execution, Mesh(np.array(devs), ("b",)))
    devs = tuple(devices) if devices is not None else tuple(jax.local_devices())
    return _Placement(devs, execution, None)


def _n_dev(place: _Placement) -> int:
    if place.execution == "per_device":
        return place.size * jax.process_count()
    return place.size


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


def _fetch(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _compile(fn: Callable, mesh: Mesh | None) -> Callable:
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
