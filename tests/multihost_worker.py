"""One process of tests/test_diagnostics_multihost.py (not a test module itself).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT INPUT.npz OUTPUT.npz

Joins a localhost coordinator (gloo collectives on CPU), runs the base cache and the diagnostics
of the problem in INPUT.npz once per execution (per_device, spmd over the global devices), and
writes e, c and r_eff(theta0) of each to OUTPUT.npz.
"""

import sys

import jax


def main(pid: int, nproc: int, port: str, inp: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=90)
    import numpy as np

    from larv_jax import diagnostics as dg

    assert jax.process_count() == nproc and len(jax.local_devices()) == 1
    z = np.load(inp)
    base = {k[2:]: z[k] for k in z.files if k.startswith("b:")}
    delta = {k[2:]: z[k] for k in z.files if k.startswith("d:")}
    us = dg.units({p: v.shape for p, v in base.items()})
    got = {}
    for execution, devices in (("per_device", None), ("spmd", jax.devices())):
        cache = dg.base_cache(base, us, execution=execution, devices=devices)
        d = dg.diagnose(base, delta, units=us, key=jax.random.PRNGKey(5), cache=cache,
                        execution=execution, devices=devices)
        assert d.settings["devices"] == nproc and d.settings["execution"] == execution
        got.update({f"{execution}:e": d.e, f"{execution}:c": d.c,
                    f"{execution}:reff": np.concatenate([np.ravel(r) for r in cache.reff])})
    np.savez(out, **got)
    print("OK", pid, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
