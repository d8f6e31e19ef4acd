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


# -- --json: one document on stdout, for every command ---------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny inputs for every command: three vision checkpoints of one architecture, a CLIPModel
    with a tokenizer (``larv eval``), and a zoo directory whose manifest ``larv zoo build``
    reuses (the real build is `tests/test_zoo_demo.py`'s)."""
    import json

    from helpers import make_hf_vision
    from test_eval_cli import CFG, _tokenizer_json, jax_to_np

    from larv_jax.checkpoint import save_hf
    from larv_jax.models.clip import init_params
    from larv_jax.zoo import zoo_spec

    root = tmp_path_factory.mktemp("tiny")
    for i in range(3):
        make_hf_vision(root / f"m{i}", seed=i)
    save_hf(jax_to_np(init_params(CFG, seed=4)), CFG, root / "clip",
            extra_files={"tokenizer.json": _tokenizer_json()})
    (root / "zoo").mkdir()
    (root / "zoo" / "manifest.json").write_text(json.dumps({
        "seed": 0, "quick": True, "spec_hash": zoo_spec(True).digest(), "files": {},
        "tasks": {"colours": {"classes": ["red", "blue"], "zero_shot_top1": 0.5,
                              "finetuned_top1": 0.75}},
        "timings_s": {"total": 1.0}}))
    return root


def _argv(name, root, out):
    """The command line of ``name`` on the tiny inputs, writing under ``out``."""
    m = [str(root / f"m{i}") for i in range(3)]
    return {
        "inspect": ["inspect", m[0], "--out", str(out / "inspect.json")],
        "convert": ["convert", m[0], "--to", "hf", "--out", str(out / "conv")],
        "merge": ["merge", "--base", m[0], "--models", *m[1:], "--method", "ties",
                  "--out", str(out / "merged")],
        "diagnose": ["diagnose", "--base", m[0], "--models", *m[1:], "--k", "4",
                     "--out", str(out / "diag")],
        "run": ["run", "--config", "configs/b32_ta8.py:quick", "--set", f"base={m[0]!r}",
                "--set", f"models={m[1:]!r}", "--set", "mergers=[{'method': 'task_arithmetic'}]",
                "--set", "gates=[{'gate': 'none'}]", "--out", str(out / "run")],
        "eval": ["eval", "--clip", str(root / "clip"), "--tasks", "mnist", "--limit", "4",
                 "--batch-size", "4", "--threads", "1", "--out", str(out / "eval")],
        "zoo build": ["zoo", "build", "--quick", "--out", str(root / "zoo")],
        "zoo show": ["zoo", "show", "--zoo", str(root / "zoo"), "--out", str(out / "zoo.md")],
    }[name]


# `larv demo` (and a real `larv zoo build`) print theirs in this test, which builds the quick zoo
JSON_ELSEWHERE = {"demo": "tests/test_zoo_demo.py::test_zoo_cli_then_demo_quick"}
HEADLINE = {"inspect": "num_params", "convert": "to", "merge": "merged_params",
            "diagnose": "num_units", "run": "cells", "eval": "average", "zoo build": "tasks",
            "zoo show": "tasks"}


def test_every_command_has_a_json_run():
    assert set(HEADLINE) | set(JSON_ELSEWHERE) == {" ".join(n) for n, _ in LEAVES}


@pytest.mark.parametrize("name", sorted(HEADLINE))
def test_json_is_one_document_on_stdout(name, tiny, tmp_path, capsys):
    import json
    from pathlib import Path

    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        assert main([*_argv(name, tiny, tmp_path), "--json", "--no-progress"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)  # the whole of stdout is one document (one line)
    assert cap.out.count("\n") == 1
    assert doc["command"] == name and doc["status"] == 0 and doc["ok"] is True
    assert doc["error"] is None and doc["dry_run"] is False and doc["plan"] is None
    assert doc["results"][HEADLINE[name]] is not None
    assert doc["timings"]["total_s"] > 0
    assert all(Path(p).is_file() for p in doc["outputs"])
    assert all({"role", "path"} <= set(i) for i in doc["inputs"])
    if name != "zoo build":  # a reused zoo reads and writes nothing
        assert doc["outputs"] and doc["inputs"]
    if name == "merge":  # the merge hashes its inputs: the hashes are the files'
        from larv_jax.io import sha256_file

        assert all(i["sha256"] == sha256_file(i["path"]) for i in doc["inputs"])
    else:
        assert all("sha256" not in i for i in doc["inputs"])
    assert cap.err.strip()  # the human text went to stderr


def test_json_error_document_and_quiet(tiny, tmp_path, capsys):
    import json

    argv = ["merge", "--base", str(tmp_path / "nope"), "--models", str(tiny / "m1"),
            "--method", "ties", "--out", str(tmp_path / "o")]
    assert main([*argv, "--json"]) == 1
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["ok"] is False and doc["status"] == 1 and doc["outputs"] == []
    assert cap.err == f"larv merge: error: {doc['error']}\n" and "nope" in doc["error"]
    # --quiet silences the human text only: the document is still printed, alone
    assert main(["inspect", str(tiny / "m0"), "--json", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["results"]["model"] == "CLIPVisionModel" and cap.err == ""


def test_old_spellings_still_work(tiny, tmp_path):
    """``larv run --out-dir`` and ``larv zoo build --force`` are ``--out`` / ``--overwrite``."""
    parser = build_parser()
    args = parser.parse_args(["run", "--config", "c.py", "--out-dir", "d"])
    assert str(args.out) == "d"
    args = parser.parse_args(["zoo", "build", "--force"])
    assert args.overwrite is True
