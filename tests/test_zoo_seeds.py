"""The demo's seed study (``larv_jax.zoo.seeds``) against a hand-computed case."""

import math

import pytest

from larv_jax.zoo import report
from larv_jax.zoo import seeds as S


def _row(merger, gate, accs):
    return {"merger": merger, "gate": gate,
            "eval": {"tasks": {t: {"top1": a} for t, a in zip(("a", "b"), accs, strict=True)}}}


def _runs():
    # two tasks; averages per seed written next to each row
    m = report.matched_name("tiered")
    return {
        0: [_row("ta", "none", (0.50, 0.70)),     # 0.60
            _row("ta", "tiered", (0.60, 0.70)),   # 0.65
            _row("ta", m, (0.55, 0.70))],         # 0.625
        1: [_row("ta", "none", (0.40, 0.60)),     # 0.50
            _row("ta", "tiered", (0.50, 0.60)),   # 0.55 (+0.05)
            _row("ta", m, (0.50, 0.50))],         # 0.50
        2: [_row("ta", "none", (0.60, 0.60)),     # 0.60
            _row("ta", "tiered", (0.70, 0.60)),   # 0.65 (+0.05)
            _row("ta", m, (0.60, 0.70))],         # 0.65
    }


def test_aggregate_by_hand():
    runs = _runs()
    entries = S.aggregate(runs, {s: ("a", "b") for s in runs}, gates=("tiered",),
                          matched={"tiered": report.matched_name("tiered")})
    assert [(e["merger"], e["veneer"]) for e in entries] == [("ta", "none"), ("ta", "tiered")]
    plain, tiered = entries
    # plain: 0.60, 0.50, 0.60 -> mean 0.5667, sd = sqrt(((1/30)^2 * 2 + (2/30)^2) / 2)
    assert plain["accuracy"]["mean"] == pytest.approx(17 / 30)
    assert plain["accuracy"]["sd"] == pytest.approx(math.sqrt((2 * (1 / 30) ** 2 + (2 / 30) ** 2) / 2))
    assert plain["gain"] is None and plain["matched"] is None
    # tiered gains: +0.05 on every seed -> sd 0, exceeds its spread, 3/3 improved
    assert tiered["gain"]["values"] == pytest.approx([0.05, 0.05, 0.05])
    assert tiered["gain"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert tiered["gain"]["improved"] == 3 and tiered["gain_exceeds_spread"]
    # matched control gains: +0.025, 0.0, +0.05 -> mean 0.025, sd 0.025
    assert tiered["matched"]["mean"] == pytest.approx(0.025)
    assert tiered["matched"]["sd"] == pytest.approx(0.025)
    # gate - matched: +0.025, +0.05, 0.0 -> mean 0.025, sd 0.025: |mean| == sd, and one seed is
    # zero (not one sign): not beyond the spread
    assert tiered["vs_matched"]["values"] == pytest.approx([0.025, 0.05, 0.0])
    assert not tiered["vs_matched_exceeds_spread"]
    table = S.table(entries, display={"ta": "Task Arithmetic"})
    assert "| Task Arithmetic | tiered | 61.67 ± 5.77 | +5.00 ± 0.00 | 3/3 | yes | +2.50 ± 2.50 | " \
           "+2.50 ± 2.50 | no |" in table
    summary = S.veneer_summary(entries)
    assert summary["tiered"]["up"] == 1 and summary["tiered"]["down"] == 0
    assert summary["tiered"]["mean_gain"] == pytest.approx(0.05)


def test_one_seed_claims_nothing_and_missing_cells_are_dropped():
    runs = {0: _runs()[0]}
    entries = S.aggregate(runs, {0: ("a", "b")}, gates=("tiered",),
                          matched={"tiered": report.matched_name("tiered")})
    tiered = entries[1]
    assert tiered["gain"]["sd"] is None and not tiered["gain_exceeds_spread"]
    # a cell missing from one seed is not aggregated
    runs = _runs()
    runs[2] = [r for r in runs[2] if r["gate"] != "tiered"]
    entries = S.aggregate(runs, {s: ("a", "b") for s in runs}, gates=("tiered",),
                          matched={"tiered": report.matched_name("tiered")})
    assert [e["veneer"] for e in entries] == ["none"]


def test_exceeds_spread_needs_one_sign():
    assert S.exceeds_spread(S.stats([0.03, 0.02, 0.04]))
    assert not S.exceeds_spread(S.stats([0.06, -0.001, 0.06]))  # |mean| > sd but a negative seed
    assert not S.exceeds_spread(S.stats([-0.01, 0.01, 0.0]))
    assert S.exceeds_spread(S.stats([-0.03, -0.02, -0.04]))
