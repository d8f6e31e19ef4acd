"""Atomic outputs: write to a temporary sibling path, rename into place only on success.

A temporary is named ``.NAME.HOST-PID.XXXXXXXX.tmp`` (HOST: 6 hex digits of a hash of the host
name, PID: the writing process), so that a later run writing NAME can tell the leftovers of a
killed writer (SIGKILL, a power cut) from those of a writer still running, here or on another
machine sharing the directory, and remove only the former. SIGTERM is turned into an exception
(:class:`Terminated`) while a temporary exists, so that it is removed like on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that ``finally`` blocks (temporaries) run. A
    :class:`SystemExit` with status 143 (128 + 15): uncaught, the process exits with it, as a
    shell reports a process killed by SIGTERM, without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_raises(*, only_if_default: bool = False) -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    SIGTERM during the unwinding is ignored, so the clean-up it runs is not cut short); the
    previous handler is restored on exit. A no-op off the main thread (Python runs handlers
    only there) and, with ``only_if_default``, when SIGTERM already has a handler (the CLI's, a
    caller's, or SIG_IGN)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if only_if_default and previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit rename it to ``path``.

    On an exception the temporary file or directory is removed and ``path`` is left as it was;
    so on SIGTERM too, in the main thread (:func:`sigterm_raises`, when SIGTERM has no handler
    yet). With ``is_dir`` the yielded path is an (empty, existing) directory. ``overwrite=False``
    refuses an existing ``path`` with ``FileExistsError`` before anything is written. Stale
    temporaries of ``path`` left by writers that are no longer running are removed first
    (:func:`remove_stale_temporaries`, a warning naming each).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    stem = _short_name(path.name)
    with sigterm_raises(only_if_default=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.{_owner()}.", suffix=".tmp",
                                    dir=path.parent))
        try:
            yield tmp if is_dir else tmp / path.name
            if is_dir:
                if path.exists():
                    old = path.with_name(f".{stem}.old.{os.getpid()}")
                    os.replace(path, old)
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, path)
            else:
                if path.is_dir():
                    raise IsADirectoryError(f"{path} is a directory; expected a file path")
                os.replace(tmp / path.name, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _host() -> str:
    """6 hex digits naming this machine in temporary names (a pid means nothing elsewhere)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _owner() -> str:
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a reused pid counts as alive: the
    temporary is then kept, never a live writer's removed)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):   # another user's process, or cannot tell: keep it
        return True
    return True


def _size(p: Path) -> int:
    """Bytes under ``p`` (a file or a directory tree; links not followed)."""
    if not p.is_dir() or p.is_symlink():
        return p.lstat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def remove_stale_temporaries(path: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporaries of ``path`` (``.NAME.HOST-PID.XXXXXXXX.tmp``, and
    ``.NAME.old.PID`` of a replaced directory once ``path`` is in place) whose writer was this
    machine's process PID and that process is gone (killed before it could clean up). Those of
    a live process (a concurrent run) or of another host are kept; so are the pid-less
    ``.NAME.xxxxxxxx.tmp`` of earlier versions (their writer cannot be told). Returns
    ``[(removed path, bytes)]`` and warns once per entry. POSIX only (elsewhere nothing is removed)."""
    path = Path(path)
    if os.name != "posix":
        return []
    stem = _short_name(path.name)
    here = _host()
    pat = re.compile(rf"\.{re.escape(stem)}\."
                     r"(?:([0-9a-f]{6})-(\d+)\.[a-z0-9_]+\.tmp|old\.(\d+))")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        m = pat.fullmatch(entry.name)
        if m is None:
            continue
        host, pid, old_pid = m.groups()
        if old_pid is not None:
            if not path.exists():        # killed between the two renames: keep the old output
                continue
            host, pid = here, old_pid
        if host != here or _alive(int(pid)):
            continue
        p = Path(entry.path)
        try:
            size = _size(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:        # another run removed it first
            continue
        except OSError as e:
            warnings.warn(f"{p}: could not remove a stale temporary ({e.strerror or e})",
                          stacklevel=3)
            continue
        removed.append((p, size))
        warnings.warn(f"removed {p} ({_megabytes(size)}), a temporary left by process {pid}, "
                      "which is no longer running", stacklevel=3)
    return removed


def _short_name(name: str, limit: int = 200) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes, so that the temporary names built from it
    (``.NAME.HHHHHH-PID.xxxxxxxx.tmp``: at most 1 + 200 + 1 + 6 + 1 + 10 + 1 + 8 + 4 = 232
    bytes; ``.NAME.old.PID``) stay under the 255-byte limit of a file name even when ``name``
    itself is legal at 250 bytes."""
    raw = name.encode()
    return name if len(raw) <= limit else raw[:limit].decode(errors="ignore")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, *, missing: str) -> Any:
    """The JSON document at ``path``. A missing file is a FileNotFoundError
    ``"{path}: {missing}"``, a malformed one a ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
