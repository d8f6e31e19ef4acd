"""The flags every ``larv`` command shares, added in one place (:func:`add_common_arguments`) and
acted on in one place (:func:`common_context`, entered by ``larv_jax.cli.main`` around a command):

- ``--no-progress``: no tqdm progress bars (tqdm's default ``disable`` is set for the command's
  duration, which every bar in the package honours);
- ``--quiet``: nothing on stdout; errors and warnings still go to stderr.

Module-level imports stay light (argparse): CLI modules are all imported to build the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

COMMON_FLAGS = ("--no-progress", "--quiet")


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the common flags (in their own argument group) to ``parser``."""
    g = parser.add_argument_group("common flags (every command)")
    g.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (default: bars on, on stderr)")
    g.add_argument("--quiet", action="store_true",
                   help="print nothing on stdout; errors and warnings still go to stderr "
                        "(default: off)")
    return parser


@contextlib.contextmanager
def common_context(args: argparse.Namespace) -> Iterator[None]:
    """Apply the common flags of ``args`` while a command runs; restore everything after."""
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
        yield
    sys.stdout.flush()

