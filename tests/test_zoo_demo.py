"""``larv zoo build --quick`` and ``larv demo --quick`` end to end: files, table, plot, and the
plain Task Arithmetic row checked against an independent merge + evaluation."""

import json

import numpy as np

from larv_jax.cli import main
from larv_jax.zoo import open_zoo, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_zoo_cli_then_demo_quick(tmp_path, capsys):
    zoo_dir, out = tmp_path / "zoo", tmp_path / "demo"
    assert main(["zoo", "build", "--quick", "--out", str(zoo_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot top-1" in printed and "fine-tuned top-1" in printed
    zoo = open_zoo(zoo_dir)
    assert main(["zoo", "show", "--zoo", str(zoo_dir)]) == 0
    assert main(["demo", "--quick", "--zoo", str(zoo_dir), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "using the zoo in" in printed  # the zoo was reused, not rebuilt

    names = list(zoo.task_names)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    veneers = ["none", *report.LARV_GATES, *report.QUICK_SCHEDULES, report.MATCHED]
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
            matched = by_cell[(r["merger"], report.MATCHED)]["s"]
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
