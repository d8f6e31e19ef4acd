"""Conformance of the common flags: every command the parser registers (subcommands of subcommands
included) takes them, and they behave the same way on each."""

import argparse

import pytest

from larv_jax.cli import build_parser, main
from larv_jax.cli.common import COMMON_FLAGS


def _leaf_parsers(parser, prefix=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaf_parsers(p, (*prefix, name))


LEAVES = list(_leaf_parsers(build_parser()))


def test_every_command_is_walked():
    names = {" ".join(n) for n, _ in LEAVES}
    assert {"inspect", "convert", "diagnose", "merge", "run", "eval", "demo", "zoo build",
            "zoo show"} <= names


@pytest.mark.parametrize("name,parser", LEAVES, ids=[" ".join(n) for n, _ in LEAVES])
def test_every_command_takes_the_common_flags(name, parser):
    options = {o for a in parser._actions for o in a.option_strings}
    missing = [f for f in COMMON_FLAGS if f not in options]
    assert not missing, f"larv {' '.join(name)} lacks {missing}"


def test_quiet_prints_nothing_on_stdout_but_errors_still_show(tmp_path, capsys):
    from helpers import make_hf_clip

    path = tmp_path / "clip"
    make_hf_clip(path, seed=1)
    assert main(["inspect", str(path)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["inspect", str(path), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(path) + "-missing", "--quiet"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("larv inspect: error: ")


def test_no_progress_disables_every_bar_and_is_restored(monkeypatch, capsys):
    import larv_jax.cli.zoo as zoo_cmd

    seen = {}

    def fake_run(args):
        from tqdm import tqdm

        bar = tqdm(range(3), desc="bar")
        seen["disable"] = bar.disable
        for _ in bar:
            pass
        return 0

    monkeypatch.setattr(zoo_cmd, "run", fake_run)
    assert main(["zoo", "show", "--no-progress"]) == 0
    assert seen["disable"] is True and "bar" not in capsys.readouterr().err
    assert main(["zoo", "show"]) == 0  # restored after the command
    assert seen["disable"] is False and "bar" in capsys.readouterr().err
