"""The flags every ``larv`` command shares, added in one place and acted on in one place.

:func:`add_common_arguments` (every command) adds

- ``--no-progress``: no tqdm progress bars (tqdm's default ``disable`` is set for the command's
  duration, which every bar in the package honours);
- ``--quiet``: no human-readable text on stdout; errors and warnings still go to stderr;
- ``--json``: exactly one JSON document on stdout when the command ends (:class:`Report`), the
  machine channel: the human text a command prints goes to stderr instead (nowhere with
  ``--quiet``; ``--quiet`` never silences the JSON document).

:func:`add_output_arguments` (every command) adds ``--out`` and ``--overwrite``, with the
command's own help, default and old spellings (``larv run --out-dir``, ``larv zoo build
--force``). :func:`common_context`, entered by ``larv_jax.cli.main`` around a command, applies
the flags and hands the command its :class:`Report` (:func:`report`); :func:`emit_json` prints
the document once the exit status is known, on success and on error alike.

The document (schema version 1; keys always present)::

    {"larv_json": 1, "command": "merge", "status": 0, "ok": true, "error": null,
     "dry_run": false,
     "outputs": ["out/model.safetensors", ...],          # files written (none on a dry run)
     "inputs": [{"role": "base", "path": "...", "sha256": "..."}, ...],  # sha256 only where
                                                          # the command computed it
     "timings": {"merge_s": 1.2, ...},                    # seconds per phase; total_s always
     "results": {...},                                    # the command's headline numbers
     "plan": null | {...},                                # --dry-run: what would be done
     "warnings": ["..."]}

Module-level imports stay light (argparse): CLI modules are all imported to build the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMON_FLAGS = ("--no-progress", "--quiet", "--json", "--out", "--overwrite")
JSON_SCHEMA_VERSION = 1


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--no-progress``, ``--quiet`` and ``--json`` (in their own argument group)."""
    g = _group(parser)
    g.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (default: bars on, on stderr)")
    g.add_argument("--quiet", action="store_true",
                   help="no human-readable text on stdout; errors and warnings still go to "
                        "stderr, and --json's document is still printed (default: off)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout at the end (outputs, inputs, timings, "
                        "headline numbers, warnings; an error too); the human text goes to "
                        "stderr (default: off)")
    return parser


def add_output_arguments(parser: argparse.ArgumentParser, *, help: str,
                         overwrite_help: str = "replace an existing --out (default: refuse)",
                         required: bool = False, default: Any = None,
                         aliases: tuple[str, ...] = (),
                         overwrite_aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Add ``--out`` (a path) and ``--overwrite`` to the common-flags group of ``parser``.

    ``help`` says what ``--out`` is for this command and names its default; ``aliases`` /
    ``overwrite_aliases`` are older spellings kept working (same destination)."""
    g = _group(parser)
    g.add_argument("--out", *aliases, dest="out", type=Path, required=required, default=default,
                   help=help + (f" ({', '.join(aliases)}: the old name, still accepted)"
                                if aliases else ""))
    g.add_argument("--overwrite", *overwrite_aliases, dest="overwrite", action="store_true",
                   help=overwrite_help + (f" ({', '.join(overwrite_aliases)}: the old name, "
                                          "still accepted)" if overwrite_aliases else ""))
    return parser


def add_dry_run_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--dry-run``: the command's checks (its real run's own), the plan printed, nothing
    written; exit 0, or the error and status the real run would give."""
    parser.add_argument("--dry-run", action="store_true",
                        help="open every input and run every check the real run makes before "
                             "its first weight or example is read; print the plan (reads, "
                             "computes, writes, an estimate of peak memory) and write nothing; "
                             "exits 0 or with the real run's error (default: off)")
    return parser


def checkpoint_reads(sources) -> list[dict[str, Any]]:
    """The plan's ``reads`` for ``[(role, opened checkpoint), ...]``: path, format, architecture,
    stored dtype, parameter count and file sizes, all from the headers."""
    out = []
    for role, src in sources:
        files = [Path(f) for f in getattr(src, "files", [])]
        config = getattr(src, "config", None)
        out.append({"role": role, "path": str(getattr(src, "origin", "")),
                    "format": getattr(src, "format", None),
                    "architecture": None if config is None else config.name,
                    "source_dtype": str(getattr(src, "source_dtype", "")),
                    "parameters": sum(numel(src.shape(p)) for p in src.paths()),
                    "bytes": sum(f.stat().st_size for f in files if f.exists())})
    return out


def numel(shape) -> int:
    """The number of elements of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


MEMORY_NOTE = ("an estimate: the sum of the named buffers, from the shapes alone; the method's "
               "own temporaries and the Python / XLA runtime are not counted")


def peak_memory(parts: dict[str, int]) -> dict[str, Any]:
    """The plan's ``memory``: ``{"peak_bytes": sum, "parts": {buffer: bytes}, "note"}``."""
    parts = {k: int(v) for k, v in parts.items()}
    return {"peak_bytes": sum(parts.values()), "parts": parts, "note": MEMORY_NOTE}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def run_planned(args: argparse.Namespace, command: str, plan: Any, execute: Any) -> int:
    """A command that is ``plan`` then ``execute`` (merge, diagnose, eval): ``plan(args)`` makes
    every check and returns an object with a printable ``summary``; ``--dry-run`` prints that
    and stops (exit 0), the real run goes on to ``execute(args, the plan)``."""
    p = plan(args)
    if args.dry_run:
        report(args).plan = p.summary
        print_plan(command, p.summary)
        return 0
    return execute(args, p)


def print_plan(command: str, plan: dict[str, Any]) -> None:
    """``--dry-run``'s human text: what would be read, computed and written, and the memory."""
    print(f"larv {command} --dry-run: every check passed; nothing written")
    print("reads:")
    for r in plan.get("reads", []):
        extra = ", ".join(f"{k} {r[k]}" for k in ("format", "architecture", "source_dtype")
                          if r.get(k))
        size = f", {_gib(r['bytes'])}" if r.get("bytes") else ""
        params = f", {r['parameters']:,} parameters" if r.get("parameters") else ""
        print(f"  {r['role']}: {r['path']} ({extra}{params}{size})")
    print("computes:")
    for c in plan.get("computes", []):
        print(f"  {c}")
    print("writes:")
    for w in plan.get("writes", []):
        print(f"  {w}")
    m = plan.get("memory")
    if m:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in m["parts"].items())
        print(f"peak memory: ~{_gib(m['peak_bytes'])} ({parts}; {m['note']})")


def _group(parser: argparse.ArgumentParser):
    title = "common flags (every command)"
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


class Report:
    """What a command did, for ``--json``: the command fills it, :func:`emit_json` prints it.

    Filled whether or not ``--json`` is given (cheap: paths, numbers), so a command has one code
    path; only what the command computed anyway goes in (no extra hashing, no extra reads)."""

    def __init__(self, command: str):
        self.command = command
        self.outputs: list[str] = []
        self.inputs: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.plan: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self._t0 = time.perf_counter()

    def input(self, role: str, path: Any, sha256: str | None = None) -> None:
        """An input the command read; ``sha256`` only when the command computed it."""
        entry: dict[str, Any] = {"role": role, "path": str(path)}
        if sha256 is not None:
            entry["sha256"] = sha256
        self.inputs.append(entry)

    def output(self, path: Any) -> None:
        """A path written: a file, or a directory (listed as the files under it)."""
        p = Path(path)
        if not p.exists():
            return
        if p.is_dir():
            self.outputs.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file())
        else:
            self.outputs.append(str(p))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block into ``timings[name]`` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def document(self, status: int, error: str | None = None) -> dict[str, Any]:
        timings = dict(self.timings)
        timings["total_s"] = time.perf_counter() - self._t0
        return {"larv_json": JSON_SCHEMA_VERSION, "command": self.command, "status": status,
                "ok": status == 0, "error": error, "dry_run": self.plan is not None,
                "outputs": list(self.outputs), "inputs": list(self.inputs), "timings": timings,
                "results": self.results, "plan": self.plan, "warnings": list(self.warnings)}


def command_name(args: argparse.Namespace) -> str:
    """``merge``, ``zoo build``, ...: the command and its action, as typed."""
    parts = [getattr(args, "command", None), getattr(args, "zoo_command", None)]
    return " ".join(p for p in parts if p) or "larv"


def report(args: argparse.Namespace) -> Report:
    """The :class:`Report` of the running command (made on first use when a command's ``run``
    is called without ``larv_jax.cli.main``, as some tests do)."""
    rep = getattr(args, "_report", None)
    if rep is None:
        rep = Report(command_name(args))
        args._report = rep
    return rep


class UsageError(ValueError):
    """A command line that cannot run as written (a required flag missing once a config has
    been read): exit status 2, like argparse's own usage errors, with one line."""


def error_message(e: BaseException) -> str:
    """The one line ``larv CMD: error: ...`` says for an exception ``main`` maps to status 1."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return str(e)


@contextlib.contextmanager
def common_context(args: argparse.Namespace) -> Iterator[Report]:
    """Apply the common flags of ``args`` while a command runs; restore everything after.
    Yields the command's :class:`Report` (also ``report(args)``)."""
    rep = report(args)
    args._json_stream = sys.stdout  # the machine channel: stdout as it was before any redirect
    with contextlib.ExitStack() as stack:
        if getattr(args, "no_progress", False):
            # tqdm reads TQDM_DISABLE once, when it is imported, so the default is set on the
            # class itself; every bar (tqdm.auto's included) goes through tqdm.std.tqdm.__init__
            import functools

            from tqdm import std

            init = std.tqdm.__init__
            std.tqdm.__init__ = functools.partialmethod(init, disable=True)
            stack.callback(setattr, std.tqdm, "__init__", init)
        if getattr(args, "quiet", False):
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        elif getattr(args, "json", False):
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        _record_warnings(stack, rep)
        yield rep
    sys.stdout.flush()


def _record_warnings(stack: contextlib.ExitStack, rep: Report) -> None:
    """Every warning shown while the command runs is also listed in the report."""
    import warnings

    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        rep.warnings.append(str(message))
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    stack.callback(setattr, warnings, "showwarning", show)


def emit_json(args: argparse.Namespace, status: int, error: str | None = None) -> None:
    """With ``--json``: print the command's document as one line on the stdout the command
    started with (also after an error: ``ok`` false, ``error`` the one-line message)."""
    if not getattr(args, "json", False):
        return
    import json

    from larv_jax.io import json_default

    stream = getattr(args, "_json_stream", None) or sys.stdout
    doc = json.loads(json.dumps(report(args).document(status, error), default=json_default))
    stream.write(json.dumps(_strict(doc)) + "\n")
    stream.flush()


def _strict(o: Any) -> Any:
    """NaN and infinities as null: strict JSON, which jq and most parsers insist on."""
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_strict(v) for v in o]
    return o
