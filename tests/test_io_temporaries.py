"""Temporaries of atomic outputs: SIGTERM mid-write removes them (exit 143, one line); a SIGKILL
leaves one, which the next run writing the same output removes and reports; a live writer's
(a concurrent run's) or another host's temporary is never touched.

The writer is stopped at a known point, deterministically: a subprocess whose
``write_safetensors`` (inside :func:`larv_jax.io.atomic_path`) writes the whole file, then
creates a sentinel file and blocks; the test waits for the sentinel before signalling."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from larv_jax import io, tree
from larv_jax.checkpoint import save_hf
from larv_jax.models.clip import abstract_params
from larv_jax.models.config import CLIPConfig, VisionConfig

VCFG = CLIPConfig(vision=VisionConfig(width=16, layers=2, heads=2, mlp_dim=32, image_size=16,
                                      patch_size=8))

# `larv merge` whose save blocks after writing model.safetensors into its temporary directory
BLOCKED_MERGE = """
import os, sys, time
import larv_jax.checkpoint.core as core
write = core.write_safetensors
def blocked(path, *a, **k):
    write(path, *a, **k)
    with open(os.environ["SENTINEL"] + ".part", "w") as f:
        f.write(str(path))
    os.replace(os.environ["SENTINEL"] + ".part", os.environ["SENTINEL"])
    time.sleep(300)   # interrupted by the test's signal
core.write_safetensors = blocked
from larv_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    base = {p: rng.standard_normal(s.shape).astype(np.float32)
            for p, s in tree.flatten(abstract_params(VCFG)).items()}
    save_hf(base, VCFG, d / "base")
    for i in range(2):
        save_hf({p: v + np.float32(0.01 * (i + 1)) for p, v in base.items()}, VCFG, d / f"m{i}")
    return d


def _merge_argv(ckpts, out):
    return ["merge", "--base", str(ckpts / "base"), "--models", str(ckpts / "m0"),
            str(ckpts / "m1"), "--method", "task_arithmetic", "--no-hash", "--no-progress",
            "--quiet", "--out", str(out)]


def _env():
    return {**os.environ, "LARV_JAX_CACHE_DIR": "off"}


def _start_blocked(ckpts, out, sentinel):
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_MERGE, *_merge_argv(ckpts, out)],
                            env={**_env(), "SENTINEL": str(sentinel)}, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not sentinel.exists():   # waits for a state, not for time: polled until it holds
        if proc.poll() is not None:
            pytest.fail(f"writer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("writer never reached the save")
        time.sleep(0.02)
    return proc


def _temporaries(d, name="out"):
    return sorted(p for p in d.iterdir() if p.name.startswith(f".{name}."))


def test_sigterm_mid_write_exits_143_with_one_line_and_leaves_nothing(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_blocked(ckpts, out, tmp_path / "sentinel")
    tmp = _temporaries(tmp_path)
    # the temporary is named after its writer: .out.HOST-PID.xxxxxxxx.tmp, holding the weights
    assert len(tmp) == 1 and re.fullmatch(rf"\.out\.[0-9a-f]{{6}}-{proc.pid}\.[a-z0-9_]+\.tmp",
                                          tmp[0].name), tmp
    assert (tmp[0] / "model.safetensors").stat().st_size > 10_000
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "larv merge: terminated", err
    assert _temporaries(tmp_path) == [] and not out.exists()


def test_sigkill_leaves_a_temporary_the_next_run_removes_and_reports(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_blocked(ckpts, out, tmp_path / "sentinel")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = _temporaries(tmp_path)                    # SIGKILL cannot be caught
    size = sum(f.stat().st_size for f in stale.iterdir())
    assert f"-{proc.pid}." in stale.name and size > 10_000
    r = subprocess.run([sys.executable, "-m", "larv_jax", *_merge_argv(ckpts, out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == (f"larv: warning: removed {stale} ({size} bytes), a temporary "
                                f"left by process {proc.pid}, which is no longer running")
    assert _temporaries(tmp_path) == [] and (out / "model.safetensors").exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()           # reaped: no process has this pid (until the system reuses it)
    return child.pid


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    host = io._host()
    other = "000000" if host != "000000" else "ffffff"
    sleeper = subprocess.Popen(["sleep", "300"])    # a concurrent writer, alive
    dead = _dead_pid()
    try:
        keep = [f".out.{host}-{os.getpid()}.abcdefgh.tmp",   # this very process (another thread)
                f".out.{host}-{sleeper.pid}.abcdefgh.tmp",   # a live concurrent run
                f".out.{other}-{dead}.abcdefgh.tmp",         # another host's: its pid means nothing here
                ".out.abcdefgh.tmp",                         # an earlier version's: writer unknown
                f".out.1.{host}-{dead}.abcdefgh.tmp",        # the temporary of another output, out.1
                f".out.old.{dead}"]                          # out not in place: the previous output
        gone = [f".out.{host}-{dead}.dir12345.tmp", f".out.{host}-{dead}.file1234.tmp"]
        for name in [*keep, gone[0]]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "out").write_bytes(b"x" * 1000)
        (tmp_path / gone[1]).write_bytes(b"y" * 300)
        # `out` is written: only the two dead temporaries go, each named with its size
        with pytest.warns(UserWarning) as record:
            io.write_text(tmp_path / "out", "done\n")
        msgs = sorted(str(w.message) for w in record)
        assert msgs == sorted(f"removed {tmp_path / n} ({s} bytes), a temporary left by process "
                              f"{dead}, which is no longer running"
                              for n, s in zip(gone, (1000, 300), strict=True))
        assert (tmp_path / "out").read_text() == "done\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "out"])
        # once `out` is in place, a dead writer's `.out.old.PID` (its replaced output) goes too
        with pytest.warns(UserWarning, match=re.escape(f".out.old.{dead} (1000 bytes)")):
            io.write_text(tmp_path / "out", "again\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep[:-1], "out"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_long_names_keep_their_temporaries_under_255_bytes(tmp_path):
    """A legal 250-byte output name with the writer's pid in its temporary's name: the stale one
    is still recognised and removed, and the write succeeds."""
    name = "m" * 250
    stem = name[:200]
    dead = _dead_pid()
    stale = tmp_path / f".{stem}.{io._host()}-{dead}.abcdefgh.tmp"
    assert len(stale.name.encode()) <= 255
    stale.mkdir()
    with pytest.warns(UserWarning, match="no longer running"):
        with io.atomic_path(tmp_path / name) as tmp:
            assert len(tmp.parent.name.encode()) <= 255
            assert re.fullmatch(rf"\.{stem}\.[0-9a-f]{{6}}-{os.getpid()}\.[a-z0-9_]+\.tmp",
                                tmp.parent.name)
            tmp.write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == [name]


LIBRARY_WRITER = """
import os, sys, time
from larv_jax.io import atomic_path
with atomic_path(sys.argv[1], is_dir=True) as tmp:
    (tmp / "half").write_bytes(b"z" * 4096)
    open(sys.argv[2], "w").close()
    time.sleep(300)
"""


def test_sigterm_in_a_library_write_removes_the_temporary(tmp_path):
    """Outside the CLI too: a script writing through atomic_path exits 143 on SIGTERM, with no
    traceback and no temporary."""
    sentinel = tmp_path / "sentinel"
    proc = subprocess.Popen([sys.executable, "-c", LIBRARY_WRITER, str(tmp_path / "out"),
                             str(sentinel)], env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not sentinel.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(_temporaries(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == ""
    assert _temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


def test_sigterm_handler_is_scoped_and_restored(tmp_path):
    """atomic_path installs its SIGTERM handler only when none is set and restores the previous
    one; a caller's own handler is left in place while it writes."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with io.atomic_path(tmp_path / "a") as tmp:
            inside = signal.getsignal(signal.SIGTERM)
            tmp.write_text("a")
        assert callable(inside) and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        with io.atomic_path(tmp_path / "b") as tmp:
            assert signal.getsignal(signal.SIGTERM) is mine
            tmp.write_text("b")
        assert signal.getsignal(signal.SIGTERM) is mine
        # the CLI's: SIGTERM raises Terminated (a SystemExit of 143), once
        with pytest.raises(io.Terminated) as e, io.sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler runs at the next bytecode: never reached in full
        assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
