"""LARV score, gates and schedules (SPEC §3) against hand-computed cases."""

import math

import numpy as np
import pytest

from larv_jax.cli.flags import parse_key_values
from larv_jax.larv import gates, schedules
from larv_jax.larv.schedules import compute_scales, parse_spec


def test_zscore_population_std_hand_case():
    z = gates.zscore([1.0, 2.0, 3.0])
    k = 1.0 / math.sqrt(2.0 / 3.0)  # population std of (1, 2, 3) is sqrt(2/3)
    np.testing.assert_allclose(z, [-k, 0.0, k], rtol=1e-15)


@pytest.mark.parametrize("c", [[0.3, 0.3, 0.3], [0.2, 0.2, 0.2 + 1e-14], [7.0]])
def test_zscore_degenerate_std_gives_zero(c):
    np.testing.assert_array_equal(gates.zscore(c), np.zeros(len(c)))


def test_depth_prior():
    np.testing.assert_array_equal(gates.depth_prior(4), [0.25, 0.5, 0.75, 1.0])


def test_composite_score_constant_conflict():
    # c constant -> z = 0 -> denominator softplus(0) + 1 = log 2 + 1.
    e, c = [2.0, 1.0, 4.0, 0.0], [0.1, 0.1, 0.1, 0.1]
    den = math.log(2.0) + 1.0
    want = [2 * math.sqrt(0.25) / den, 1 * math.sqrt(0.5) / den, 4 * math.sqrt(0.75) / den, 0.0]
    np.testing.assert_allclose(gates.composite_score(e, c), want, rtol=1e-14)


def test_composite_score_two_units_and_ablations():
    e, c = [4.0, 1.0], [0.0, 1.0]  # z = (-1, +1)
    sp_m, sp_p = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    w = gates.composite_score(e, c)
    np.testing.assert_allclose(w, [4 * math.sqrt(0.5) / (sp_m + 1), 1.0 / (sp_p + 1)], rtol=1e-14)
    np.testing.assert_allclose(gates.composite_score(e, c, use_c=False), [4 * math.sqrt(0.5), 1.0])
    np.testing.assert_allclose(gates.composite_score(e, c, use_r=False),
                               [4 / (sp_m + 1), 1 / (sp_p + 1)], rtol=1e-14)
    np.testing.assert_allclose(gates.composite_score(e, c, use_e=False),
                               [math.sqrt(0.5) / (sp_m + 1), 1 / (sp_p + 1)], rtol=1e-14)
    np.testing.assert_array_equal(
        gates.composite_score(e, c, use_e=False, use_r=False, use_c=False), [1.0, 1.0])
    # Exponents: eta = 2, rho = 1, zeta = 2.
    np.testing.assert_allclose(gates.composite_score(e, c, eta=2, rho=1, zeta=2),
                               [16 * 0.5 / (sp_m + 1) ** 2, 1.0 / (sp_p + 1) ** 2], rtol=1e-14)


def test_composite_score_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        gates.composite_score([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        gates.composite_score([-1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        gates.composite_score([np.nan, 2.0], [1.0, 0.0])


@pytest.mark.parametrize("n,q,index", [(3, 1 / 3, 0), (3, 2 / 3, 1), (5, 1 / 3, 1), (5, 2 / 3, 3),
                                        (6, 1 / 3, 1), (6, 2 / 3, 3), (7, 1 / 3, 2), (7, 2 / 3, 4),
                                        (37, 1 / 3, 12), (37, 2 / 3, 24), (4, 0.0, 0), (4, 1.0, 3)])
def test_lower_quantile_index(n, q, index):
    # ceil(q n) - 1, computed by hand for each row.
    w = np.arange(n, dtype=np.float64)[::-1] * 10.0  # sorted ascending: 0, 10, 20, ...
    assert gates.lower_quantile(w, q) == 10.0 * index


def test_tiered_gate_hand_cases():
    # L = 5: t1 = sorted[1] = 2, t2 = sorted[3] = 4.
    np.testing.assert_array_equal(gates.tiered_gate([5.0, 1.0, 4.0, 2.0, 3.0]),
                                  [1.5, 0.5, 1.0, 0.5, 1.0])
    # L = 7 (not divisible by 3): t1 = sorted[2], t2 = sorted[4] -> 3 low, 2 mid, 2 high.
    s = gates.tiered_gate([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(s, [1.5, 1.5, 1.0, 1.0, 0.5, 0.5, 0.5])
    # Options: tier values and quantiles.
    s = gates.tiered_gate([1.0, 2.0, 3.0, 4.0], alpha=0.25, beta=0.5, tiers=(0.0, 1.0, 2.0))
    np.testing.assert_array_equal(s, [0.0, 1.0, 2.0, 2.0])


def test_tiered_gate_ties():
    # t1 = sorted[1] = 1, t2 = sorted[3] = 2.
    np.testing.assert_array_equal(gates.tiered_gate([1.0, 1.0, 1.0, 2.0, 2.0, 3.0]),
                                  [0.5, 0.5, 0.5, 1.0, 1.0, 1.5])
    # t1 = t2 = 2: the middle tier is empty, all four 2-or-less units go low.
    np.testing.assert_array_equal(gates.tiered_gate([2.0, 1.0, 2.0, 2.0, 3.0, 4.0]),
                                  [0.5, 0.5, 0.5, 0.5, 1.5, 1.5])
    np.testing.assert_array_equal(gates.tiered_gate([0.7] * 5), [0.5] * 5)


def test_continuous_gate():
    w = [1.0, 0.0, 1.0 + math.atanh(0.5) / 3.0, 100.0]
    np.testing.assert_allclose(gates.continuous_gate(w),
                               [1.0, 1.0 - 0.5 * math.tanh(3.0), 1.25, 1.5], rtol=1e-14)
    np.testing.assert_allclose(gates.continuous_gate([2.0], gamma=1.0, center=0.0, amplitude=0.2),
                               [1.0 + 0.2 * math.tanh(2.0)], rtol=1e-14)


def test_schedule_tier_index_rule():
    # floor((l - 1) n / L), l = 1..L.
    np.testing.assert_array_equal(schedules.tier_index(7, 3), [0, 0, 0, 1, 1, 2, 2])
    counts = np.bincount(schedules.tier_index(37, 3))
    np.testing.assert_array_equal(counts, [13, 12, 12])
    np.testing.assert_array_equal(schedules.tier_index(4, 12), [0, 3, 6, 9])


def test_schedules_hand_cases():
    np.testing.assert_array_equal(schedules.uniform(3, 1.2), [1.2, 1.2, 1.2])
    np.testing.assert_array_equal(schedules.none(2), [1.0, 1.0])
    np.testing.assert_allclose(schedules.linear(5), [0.5, 0.75, 1.0, 1.25, 1.5], rtol=1e-15)
    np.testing.assert_array_equal(schedules.linear(1), [1.0])
    np.testing.assert_array_equal(schedules.tier2(5), [0.5, 0.5, 0.5, 1.5, 1.5])
    np.testing.assert_array_equal(schedules.tier2(4), [0.5, 0.5, 1.5, 1.5])
    np.testing.assert_array_equal(schedules.tier3(7), [0.5, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5])
    np.testing.assert_array_equal(schedules.tier6(6), [0.5, 0.7, 0.9, 1.1, 1.3, 1.5])
    np.testing.assert_array_equal(schedules.tier6(8), [0.5, 0.5, 0.7, 0.9, 1.1, 1.1, 1.3, 1.5])
    np.testing.assert_allclose(schedules.tier12(12), [0.5 + k / 11 for k in range(12)], rtol=1e-15)
    np.testing.assert_allclose(schedules.tier12(4), [0.5 + k / 11 for k in (0, 3, 6, 9)],
                               rtol=1e-15)
    s = schedules.thirds(37, 0.0, 1.0, 1.5)
    np.testing.assert_array_equal(s, [0.0] * 13 + [1.0] * 12 + [1.5] * 12)


def test_parse_spec():
    assert parse_spec("thirds(0,1,1.5)") == ("thirds", (0, 1, 1.5), {})
    assert parse_spec(" uniform( 1.2 ) ") == ("uniform", (1.2,), {})
    assert parse_spec("tiered") == ("tiered", (), {})
    assert parse_spec("tiered(alpha=0.25, tiers=(0.4, 1, 1.6))") == (
        "tiered", (), {"alpha": 0.25, "tiers": (0.4, 1, 1.6)})
    with pytest.raises(ValueError, match=r"valid: \[.*'continuous'.*'tiered'"):
        parse_spec("tierd")
    for bad in ("thirds(0,1", "uniform(x)", "uniform(**k)", "", "3(1)"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_compute_scales_matches_components():
    rng = np.random.default_rng(0)
    e, c = rng.uniform(0.5, 3.0, 10), rng.uniform(0.0, 1.0, 10)
    res = compute_scales("tiered", e=e, c=c)
    np.testing.assert_array_equal(res.w, gates.composite_score(e, c))
    np.testing.assert_array_equal(res.z, gates.zscore(c))
    np.testing.assert_array_equal(res.s, gates.tiered_gate(res.w))
    res = compute_scales("continuous(gamma=5)", e=e, c=c, rho=1.0, gamma=1.0)  # spec wins
    np.testing.assert_array_equal(res.s, gates.continuous_gate(gates.composite_score(e, c, rho=1.0),
                                                               gamma=5.0))
    res = compute_scales("thirds(0, 1, 1.5)", num_units=6)
    assert res.w is None and res.z is None
    np.testing.assert_array_equal(res.s, [0, 0, 1, 1, 1.5, 1.5])
    np.testing.assert_array_equal(compute_scales("uniform", num_units=2, value=0.7).s,
                                  [0.7, 0.7])
    np.testing.assert_array_equal(compute_scales("tier3", e=e, c=c).s, schedules.tier3(10))


def test_compute_scales_errors():
    with pytest.raises(ValueError, match="needs the diagnostics"):
        compute_scales("tiered", num_units=4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gama'\].*'gamma'"):
        compute_scales("continuous", e=[1.0, 2.0], c=[0.0, 1.0], gama=2.0)
    with pytest.raises(ValueError, match="needs num_units"):
        compute_scales("linear")
    with pytest.raises(ValueError, match="bad arguments"):
        compute_scales("thirds(1, 2, 3, 4)", num_units=3)
    with pytest.raises(ValueError, match="keyword options only"):
        compute_scales("tiered(0.3)", e=[1.0], c=[1.0])


def test_parse_key_values_and_helpers():
    got = parse_key_values(["alpha=0.25", "tiers=0.4,1,1.6", "use_c=False", "use_r=true",
                            "x=abc", "exclude=['proj']"])
    assert got == {"alpha": 0.25, "tiers": (0.4, 1, 1.6), "use_c": False, "use_r": True,
                   "x": "abc", "exclude": ["proj"]}
    for bad in (["alpha"], ["=1"]):
        with pytest.raises(ValueError, match="--larv-set expects KEY=VALUE"):
            parse_key_values(bad, "--larv-set")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["a.b=1"], "--larv-set", identifiers=True)
    assert parse_key_values(["diagnostics.k=8"]) == {"diagnostics.k": 8}
    assert schedules.is_identity("none") and schedules.is_identity("uniform(1)")
    assert not schedules.is_identity("uniform(1.2)") and not schedules.is_identity("tiered")
    assert schedules.describe("tiered", alpha=0.25) == "tiered(alpha=0.25)"
    assert schedules.describe("thirds(0,1,1.5)") == "thirds(0, 1, 1.5)"
