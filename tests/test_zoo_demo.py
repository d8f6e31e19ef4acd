"""``larv zoo build --quick`` and ``larv demo --quick`` end to end: files, table, plot, and the
plain Task Arithmetic row checked against an independent merge + evaluation."""

import json

import numpy as np
import pytest

from larv_jax.cli import main
from larv_jax.zoo import open_zoo, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_zoo_cli_then_demo_quick(tmp_path, capsys):
    zoo_dir, out = tmp_path / "zoo", tmp_path / "demo"
    assert main(["zoo", "build", "--quick", "--out", str(zoo_dir), "--no-progress",
                 "--json"]) == 0
    cap = capsys.readouterr()
    printed = cap.err  # --json: the human text on stderr, one document on stdout
    assert "zero-shot top-1" in printed and "fine-tuned top-1" in printed
    zoo = open_zoo(zoo_dir)
    built = json.loads(cap.out)
    assert built["command"] == "zoo build" and built["ok"]
    assert set(built["results"]["tasks"]) == set(zoo.task_names)
    assert sorted(built["outputs"]) == sorted(str(zoo_dir / f) for f in zoo.manifest["files"])
    assert main(["zoo", "show", "--zoo", str(zoo_dir)]) == 0
    capsys.readouterr()
    assert main(["demo", "--quick", "--zoo", str(zoo_dir), "--out", str(out),
                 "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    printed = cap.err
    assert "using the zoo in" in printed  # the zoo was reused, not rebuilt
    demo = json.loads(cap.out)
    assert demo["command"] == "demo" and demo["ok"] and str(out / "table.md") in demo["outputs"]

    names = list(zoo.task_names)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    controls = [report.matched_name(g) for g in report.LARV_GATES]
    veneers = ["none", *report.LARV_GATES, *report.QUICK_SCHEDULES, *controls]
    assert [(r["merger"], r["gate"]) for r in rows] == [
        (m, g) for m in report.QUICK_METHODS for g in veneers]
    by_cell = {(r["merger"], r["gate"]): r for r in rows}
    for r in rows:
        assert set(r["eval"]["tasks"]) == set(names)
        assert all(0.0 <= r["eval"]["tasks"][t]["top1"] <= 1.0 for t in names)
        s = np.asarray(r["s"])
        if r["gate"] == "none":
            assert (s == 1.0).all()
        if r["gate"] == "tiered":
            assert set(np.round(s, 6)) <= {0.5, 1.0, 1.5}
        if r["gate"] == "continuous":
            assert ((s > 0.5) & (s < 1.5)).all()
        if r["gate"] in report.LARV_GATES:  # its control: one uniform scale, the gate's mean s
            matched = by_cell[(r["merger"], report.matched_name(r["gate"]))]["s"]
            np.testing.assert_allclose(matched, np.full(len(s), s.mean()), atol=1e-4)

    table = (out / "table.md").read_text()
    assert "| Method | " + " | ".join(names) + " | Avg. |" in table
    for label in ("Pretrained (zero-shot)", "Individual (fine-tuned)", "Task Arithmetic",
                  "TIES", "+ LARV (tiered)", "+ LARV (continuous)"):
        assert f"| {label} |" in table
    # the tiered TA row shows its gain over plain TA in parentheses, to one decimal
    by = {(r["merger"], r["gate"]): r for r in rows}
    ta, ta_t = (report.accuracies(by[("task_arithmetic", g)], names) for g in ("none", "tiered"))
    gain = 100 * (ta_t[-1] - ta[-1])
    assert f"{100 * ta_t[-1]:.1f} ({'+' if gain >= 0 else '-'}{abs(gain):.1f}) |" in table

    for m in report.QUICK_METHODS:
        png = out / "plots" / f"diagnostics_{m}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        diag = json.loads((out / "plots" / f"diagnostics_{m}.json").read_text())
        assert len(diag["units"]) == len(by[(m, "tiered")]["s"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == names and set(summary["larv_gain"]) == set(veneers[1:])
    # the --json headline is what summary.json and results.jsonl hold
    headline = demo["results"]["per_seed"]["0"]
    assert headline["larv_gain"] == summary["larv_gain"]
    assert [c["average_top1"] for c in headline["cells"]] == [r["eval"]["average"] for r in rows]

    # the lambda sweep: Task Arithmetic at each lambda, plain and tiered; its plain lambda = 0.3
    # cell is the grid's plain TA cell (same merge, same evaluation)
    lam_rows = [json.loads(line) for line in (out / "lambda.jsonl").read_text().splitlines()]
    assert [(r["method_options"]["scale"], r["gate"]) for r in lam_rows] == [
        (lam, g) for lam in report.QUICK_LAMBDAS for g in ("none", "tiered")]
    lam03 = next(r for r in lam_rows if r["method_options"]["scale"] == 0.3 and r["gate"] == "none")
    assert lam03["eval"] == by_cell[("task_arithmetic", "none")]["eval"]
    curves = summary["lambda"]
    assert set(curves) == {"none", "tiered"} and set(curves["none"]) == {"0.1", "0.3", "1"}
    assert (out / "plots" / "lambda_ta.png").read_bytes()[:8] == PNG_MAGIC
    assert "## Task Arithmetic against its coefficient lambda" in table
    assert "## Summary" in table and "Zero-shot" in printed and "## Summary" in printed

    # Independent check of the plain TA row: theta0 + 0.3 * sum_k (theta_k - theta0), by hand,
    # evaluated through larv_jax.eval on the zoo's TFDS test splits.
    from larv_jax.checkpoint import load_params
    from larv_jax.eval import evaluate
    from larv_jax.models.tokenizer import load_tokenizer

    cfg, clip_params = load_params(zoo.pretrained)
    fts = [load_params(p)[1]["visual"] for p in zoo.finetuned.values()]

    def ta(base, *tuned):
        if isinstance(base, dict):
            return {k: ta(base[k], *(t[k] for t in tuned)) for k in base}
        return base + np.float32(0.3) * sum(t - base for t in tuned)

    merged = {"visual": {k: ta(v, *(f[k] for f in fts)) for k, v in clip_params["visual"].items()
                         if k != "proj"}}
    res = evaluate(merged, clip_params, cfg, zoo.eval_tasks(), str(zoo.data_dir),
                   tokenizer=load_tokenizer(zoo.pretrained, cfg.text.context_length),
                   batch_size=64)
    for t in names:
        n = res["tasks"][t]["n"]
        assert abs(res["tasks"][t]["top1"] - by[("task_arithmetic", "none")]["eval"]["tasks"][t][
            "top1"]) <= 1.0 / n + 1e-9, t


def test_demo_refuses_foreign_out_dir(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert main(["demo", "--quick", "--zoo", str(tmp_path / "zoo"), "--out", str(out),
                 "--no-progress"]) == 1
    assert "not a larv demo output" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()  # refused before building anything
    assert main(["demo", "--quick", "--methods", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "unknown merge method" in capsys.readouterr().err


def test_demo_seed_study_quick(tmp_path, capsys):
    """`larv demo --seeds 0,1`: one zoo per seed (seed N beside seed 0's as <zoo>-seedN), each
    seed's files under seed<N>/, and seeds.json agreeing with the per-seed results."""
    zoo_dir, out = tmp_path / "zoo", tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "0,1", "--zoo", str(zoo_dir), "--out", str(out),
                 "--methods", "task_arithmetic", "--schedules", "", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert open_zoo(zoo_dir).manifest["seed"] == 0
    assert open_zoo(tmp_path / "zoo-seed1").manifest["seed"] == 1
    study = json.loads((out / "seeds.json").read_text())
    assert study["seeds"] == [0, 1]
    per_seed = {}
    for seed in (0, 1):
        rows = [json.loads(line) for line in
                (out / f"seed{seed}" / "results.jsonl").read_text().splitlines()]
        names = json.loads((out / f"seed{seed}" / "summary.json").read_text())["tasks"]
        per_seed[seed] = {r["gate"]: report.accuracies(r, names)[-1] for r in rows}
    tiered = next(e for e in study["entries"] if e["veneer"] == "tiered")
    gains = [per_seed[s]["tiered"] - per_seed[s]["none"] for s in (0, 1)]
    np.testing.assert_allclose(tiered["gain"]["values"], gains, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tiered["gain"]["sd"], np.std(gains, ddof=1), rtol=0, atol=1e-12)
    control = report.matched_name("tiered")
    np.testing.assert_allclose(tiered["matched"]["values"],
                               [per_seed[s][control] - per_seed[s]["none"] for s in (0, 1)],
                               rtol=0, atol=1e-12)
    assert "| Task Arithmetic | tiered |" in (out / "seeds.md").read_text()
    assert "## over seeds 0,1" in printed and "Over 2 seeds" in printed
    assert main(["demo", "--quick", "--seeds", "0,0", "--out", str(tmp_path / "o")]) == 1
    assert "distinct" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--seeds", "a"], "--seeds must be comma-separated non-negative integers; got 'a'"),
    (["--seeds", "0,,1"], "got '0,,1'"),
    (["--seeds", "-1"], "got '-1'"),
    (["--seeds", ""], "got ''"),
    (["--seeds", "1,1"], "--seeds needs distinct integers"),
    (["--seed", "-1"], "zoo seed (--seed) must be a non-negative integer; got -1"),
])
def test_demo_bad_seeds_are_one_line_errors(tmp_path, capsys, flags, needle):
    out, zoo = tmp_path / "o", tmp_path / "z"
    assert main(["demo", "--quick", *flags, "--zoo", str(zoo), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not zoo.exists()
    assert main(["zoo", "build", "--quick", "--seed", "-3", "--out", str(zoo)]) == 1
    assert "got -3" in capsys.readouterr().err and not zoo.exists()
