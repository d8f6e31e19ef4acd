"""``larv``: the command-line entry point. Subcommands live in ``larv_jax/cli/<name>.py``, each with
``add_parser(subparsers)`` and ``run(args) -> int``; this literal table wires them."""

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.formatwarning = _one_line_warning
    _enable_compile_cache()
    parser = argparse.ArgumentParser(prog="larv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = _available()
    for name in available:
        importlib.import_module(COMMANDS[name][0]).add_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"larv {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except OSError as e:  # the operating system's word, on the path it concerns, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"larv {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
