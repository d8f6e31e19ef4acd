"""Multi-host diagnostics: two local CPU processes joined by ``jax.distributed.initialize``
(a localhost coordinator, gloo collectives), each with one device, against one process with
the suite's two fake devices. The device count and the split of every bucket are the same, so
each process must hold, bit for bit, the single-process (per_device) e, c and r_eff(theta0), in
both executions (per_device: each process runs its slice, the slices are all-gathered; spmd:
one program over the global mesh, two processes' devices)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from test_diagnostics_engine import SMALL, _model

from larv_jax import diagnostics as dg

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    shapes, base, delta = _model(SMALL)
    np.savez(tmp_path / "m.npz", **{f"b:{p}": v for p, v in base.items()},
             **{f"d:{p}": v for p, v in delta.items()})
    us = dg.units(shapes)
    assert len(jax.devices()) == 2
    # The reference: per_device in this process. Not spmd here: an SPMD program over two fake
    # devices of one XLA:CPU process can hang (see larv_jax/diagnostics/devices.py); with one
    # device per process, as below, it has not.
    cache = dg.base_cache(base, us, execution="per_device")
    d = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(5), cache=cache,
                    execution="per_device")
    one = {"e": d.e, "c": d.c, "reff": np.concatenate([np.ravel(r) for r in cache.reff])}
    want = {f"{execution}:{name}": v for execution in ("per_device", "spmd")
            for name, v in one.items()}

    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", port, str(tmp_path / "m.npz"),
                               str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {i}" in out, err[-3000:]
        got = np.load(tmp_path / f"out{i}.npz")
        assert sorted(got.files) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"process {i}: {name}")


def test_auto_execution_picks_per_device_on_cpu_and_spmd_on_accelerators():
    from larv_jax.diagnostics.devices import resolve_execution

    class Fake:
        def __init__(self, platform):
            self.platform = platform

    cpu = jax.devices()
    assert resolve_execution("auto") == "per_device"           # this suite: CPU devices
    assert resolve_execution("auto", cpu) == "per_device"
    assert resolve_execution("auto", [Fake("gpu"), Fake("gpu")]) == "spmd"
    assert resolve_execution("auto", [Fake("tpu")]) == "spmd"
    assert resolve_execution("auto", [Fake("gpu"), Fake("cpu")]) == "per_device"
    assert resolve_execution("spmd", cpu) == "spmd"
    import pytest

    with pytest.raises(ValueError, match="unknown execution 'mpi'"):
        resolve_execution("mpi")
    shapes, base, delta = _model(SMALL)
    us = [u for u in dg.units(shapes) if u.name.startswith("attn")]
    d = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(0))
    assert d.settings["execution"] == "per_device"             # what "auto" ran, recorded
