"""The benchmark's intervals, verdicts and decision guide against hand-computed numbers."""

import math

import pytest

from benchmarks.stats import Verdict, advise, mean_interval, paired_difference, verdict


def test_the_mean_interval_matches_a_hand_computed_t_interval():
    # mean 0.80, s = sqrt(0.001 / 4) = 0.0158114, t_{0.975, 4} = 2.776445, half = t s / sqrt(5)
    found = mean_interval([0.80, 0.82, 0.78, 0.81, 0.79])
    assert found.n == 5
    assert found.mean == pytest.approx(0.80)
    assert found.low == pytest.approx(0.780368, abs=1e-6)
    assert found.high == pytest.approx(0.819632, abs=1e-6)
    assert found.points() == "80.0 ± 2.0"


def test_one_value_has_no_interval_and_resolves_nothing():
    found = mean_interval([0.7])
    assert found.n == 1 and math.isnan(found.low) and not found.resolved
    assert verdict(found) is Verdict.NOT_RESOLVED


def test_the_paired_difference_uses_only_the_shared_seeds():
    a = {0: 0.80, 1: 0.82, 2: 0.78}
    b = {0: 0.79, 1: 0.80, 2: 0.77, 3: 0.90}  # seed 3 has no partner and is left out
    found = paired_difference(a, b)
    assert found is not None and found.n == 3
    # differences 0.01, 0.02, 0.01: mean 0.013333, s = 0.0057735, t_{0.975, 2} = 4.302653
    assert found.mean == pytest.approx(0.0133333, abs=1e-6)
    assert found.low == pytest.approx(-0.001009, abs=1e-6)
    assert found.high == pytest.approx(0.027676, abs=1e-6)
    assert verdict(found) is Verdict.NOT_RESOLVED  # the interval spans zero
    assert paired_difference(a, {7: 0.5}) is None


def test_an_interval_that_excludes_zero_decides_the_claim_either_way():
    better = paired_difference({s: 0.8 + 0.001 * s for s in range(5)}, {s: 0.7 for s in range(5)})
    worse = paired_difference({s: 0.7 for s in range(5)}, {s: 0.8 + 0.001 * s for s in range(5)})
    assert better is not None and worse is not None
    assert verdict(better) is Verdict.HELD and verdict(worse) is Verdict.DID_NOT_HOLD


def test_the_guide_says_not_resolved_when_the_lead_spans_zero():
    scores = {
        "fedit": {0: 0.80, 1: 0.82, 2: 0.78},
        "ffa_lora": {0: 0.79, 1: 0.80, 2: 0.77},
        "fed_sb": {0: 0.60, 1: 0.61, 2: 0.62},
    }
    advice = advise("label skew", scores)
    assert advice is not None and (advice.best, advice.runner_up) == ("fedit", "ffa_lora")
    assert advice.text().startswith("**label skew**: not resolved")
    assert "spans zero" in advice.text()


def test_the_guide_names_the_winner_when_the_lead_is_resolved():
    scores = {"full": {s: 0.85 + 0.002 * s for s in range(5)}, "fedit": {s: 0.80 for s in range(5)}}
    advice = advise("label skew", scores)
    assert advice is not None
    assert advice.text().startswith("**label skew**: use `full`") and "+5.4 [" in advice.text()
