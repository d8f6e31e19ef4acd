"""Atomic outputs: write to a temporary sibling path, rename into place only on success."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit rename it to ``path``.

    On an exception the temporary file or directory is removed and ``path`` is left as it was.
    With ``is_dir`` the yielded path is an (empty, existing) directory. ``overwrite=False``
    refuses an existing ``path`` with ``FileExistsError`` before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = _short_name(path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
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
            os.replace(target, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _short_name(name: str, limit: int = 200) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes, so that the temporary names built from it
    (``.NAME.xxxxxxxx.tmp``, ``.NAME.old.PID``) stay under the 255-byte limit of a file name even
    when ``name`` itself is legal at 250 bytes."""
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
