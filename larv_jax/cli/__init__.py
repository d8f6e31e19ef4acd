"""``larv``: the command-line entry point.

Subcommands live in ``larv_jax/cli/<name>.py``, each with ``add_parser(subparsers)`` and
``run(args) -> int``; the literal table ``COMMANDS`` wires them. Exit statuses: 0 done, 1 bad input
or a failed run (one line ``larv CMD: error: ...`` on stderr), 2 usage, 130 interrupted (SIGINT),
143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from larv_jax.caches import compile_cache_dir

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "inspect": ("larv_jax.cli.inspect", "print a checkpoint's parameter tree and architecture"),
    "convert": ("larv_jax.cli.convert", "convert between HF / OpenAI / open_clip / orbax formats"),
    "diagnose": ("larv_jax.cli.diagnose", "per-layer LARV diagnostics (e, c) of a merge"),
    "merge": ("larv_jax.cli.merge", "merge fine-tuned checkpoints (optionally with LARV)"),
    "run": ("larv_jax.cli.run", "run an experiment grid from a configs/*.py file"),
    "eval": ("larv_jax.cli.eval", "zero-shot evaluation on the TFDS task suites"),
    "zoo": ("larv_jax.cli.zoo", "build the offline tiny CLIP model zoo"),
    "demo": ("larv_jax.cli.demo", "the end-to-end LARV benchmark on the offline zoo"),
}


def _available() -> dict[str, str]:
    """Commands whose module is present in this installation."""
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = help_
    return out


MIN_COMPILE_S = 0.1


def _enable_compile_cache() -> None:
    """JAX's own persistent compilation cache for every command: the LARV diagnostics, SVC and
    scoring kernels compile once per machine instead of once per run (``larv merge --larv`` on
    ViT-B/32: ~3 s of its ~7 s of LARV time in a fresh process). Set through the environment
    while jax is not imported yet (commands that never compile do not import it)."""
    d = compile_cache_dir()
    if d is None:
        return
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = d
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_S))
    elif not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line like the errors (``larv: warning: ...``), without the source line
    that Python's default format prints, which means nothing to a command-line user."""
    return f"larv: warning: {message}\n"


DESCRIPTION = """\
Merge fine-tuned CLIP vision transformers without data (Task Arithmetic, TIES, DARE, ... and the
LARV per-layer veneer), diagnose a merge layer by layer, evaluate zero-shot, and convert between
Hugging Face, OpenAI / open_clip and orbax checkpoints."""

EPILOG = """\
Run `larv COMMAND --help` for a command's flags. Documentation: README.md (quickstart and CLI
reference) and docs/SPEC.md (the method) in the larv_jax repository.
Exit statuses: 0 done, 1 bad input or failed run, 2 usage, 130 interrupted, 143 terminated."""


def version_text() -> str:
    """``larv --version``: the package version, jax's and the default backend's devices. jax is
    imported only here (and only when asked); a broken jax is reported, not raised."""
    from larv_jax import __version__

    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        jax_line = (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devices)} "
                    f"device{'s' if len(devices) != 1 else ''} ({', '.join(kinds)})")
    except Exception as e:  # noqa: BLE001 -- the version must print whatever jax does
        jax_line = f"jax unavailable ({type(e).__name__}: {e})"
    return f"larv {__version__}\n{jax_line}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version, jax's version and the devices, and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The ``larv`` parser with every available command's subparser."""
    parser = argparse.ArgumentParser(prog="larv", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = _available()
    for name in available:
        importlib.import_module(COMMANDS[name][0]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.formatwarning = _one_line_warning
    _enable_compile_cache()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return 130
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    from larv_jax.cli.common import UsageError, common_context, emit_json, error_message
    from larv_jax.io import Terminated, sigterm_raises

    try:
        # SIGTERM (kill, timeout, a batch scheduler) unwinds like Ctrl-C: temporaries removed
        with sigterm_raises(), common_context(args):
            status, error = int(module.run(args) or 0), None
    except KeyboardInterrupt:  # outputs are atomic: an interrupted run leaves nothing half-written
        status, error = 130, "interrupted"
        print(f"larv {args.command}: interrupted", file=sys.stderr)
    except Terminated as e:
        status, error = e.code, "terminated"
        print(f"larv {args.command}: terminated", file=sys.stderr)
    except UsageError as e:  # what argparse could not check: a flag a config did not give
        status, error = 2, error_message(e)
        print(f"larv {args.command}: error: {error}", file=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, OSError) as e:
        # OSError: the operating system's word, on the path it concerns, in one line
        status, error = 1, error_message(e)
        print(f"larv {args.command}: error: {error}", file=sys.stderr)
    emit_json(args, status, error)  # --json: one document on stdout, on an error too
    return status


if __name__ == "__main__":
    sys.exit(main())
