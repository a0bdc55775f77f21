"""Thresholds with a guarantee, conformal p-values and Benjamini–Hochberg (oodtune.metrics.conformal,
oodtune.deploy.guarantee): hand-computed small cases, edge cases, and simulations over thousands of calibration draws
(numpy only, seeded) that the guarantee holds at the stated rate without being trivially conservative, that
p-values of held-out ID scores are uniform, and that BH controls the false discovery rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from oodtune.deploy.guarantee import Guarantee
from oodtune.errors import ConfigError, DataError
from oodtune.metrics import threshold_at_tpr
from oodtune.metrics.conformal import (
    acceptance_lower_bound,
    benjamini_hochberg,
    conformal_p_values,
    coverage,
    guaranteed_rank,
    kth_largest,
    min_size_for_guarantee,
    point_rank,
)

# ------------------------------------------------------------------------------------------ by hand


def test_p_values_by_hand_ties_count_as_extreme():
    cal = [4.0, 1.0, 3.0, 2.0]  # n = 4, p = (1 + #{cal <= s}) / 5
    p = conformal_p_values(cal, [2.5, 0.0, 4.0, 2.0, 9.0, np.nan])
    np.testing.assert_allclose(p[:5], [3 / 5, 1 / 5, 5 / 5, 3 / 5, 5 / 5])
    assert np.isnan(p[5])
    with pytest.raises(DataError, match="finite calibration"):
        conformal_p_values([1.0, np.inf], [0.0])
    with pytest.raises(DataError, match="non-empty"):
        conformal_p_values([], [0.0])


def test_benjamini_hochberg_by_hand():
    # m = 4, q = 0.1: sorted .01 .03 .04 .5 against .025 .05 .075 .1 -> the first three
    assert benjamini_hochberg([0.04, 0.5, 0.01, 0.03], 0.1).tolist() == [True, False, True, True]
    # step-up: .03 > .025 alone, but .04 <= .05 at j = 2 flags both
    assert benjamini_hochberg([0.03, 0.04, 0.9, 0.8], 0.1).tolist() == [True, True, False, False]
    assert not benjamini_hochberg([0.2, 0.3], 0.1).any()
    # NaN (an unreadable input) is neither counted in m nor flagged: m = 2 here, .05 <= .1 * 2 / 2
    assert benjamini_hochberg([0.05, np.nan, 0.09], 0.1).tolist() == [True, False, True]
    assert benjamini_hochberg([np.nan], 0.1).tolist() == [False]
    with pytest.raises(ConfigError, match="fdr"):
        benjamini_hochberg([0.1], 1.5)


def test_guaranteed_rank_by_hand_and_its_minimum_size():
    # n = 90, p = 0.95: the smallest score is accepted by all calibration images; P(A >= .95) = 1 - .95^90 = .9901
    assert min_size_for_guarantee(0.95, 0.99) == 90
    assert guaranteed_rank(90, 0.95, 0.99) == 90 and guaranteed_rank(89, 0.95, 0.99) is None
    assert coverage(90, 90, 0.95) == pytest.approx(1 - 0.95 ** 90)
    assert 1 - 0.95 ** 89 < 0.99 <= 1 - 0.95 ** 90
    # the rank is the smallest k meeting the confidence: k - 1 does not
    for n in (100, 200, 1000, 5000):
        k = guaranteed_rank(n, 0.95, 0.99)
        assert k is not None and coverage(k, n, 0.95) >= 0.99 > coverage(k - 1, n, 0.95)
        assert acceptance_lower_bound(k, n, 0.99) >= 0.95 > acceptance_lower_bound(k - 1, n, 0.99)
        assert point_rank(n, 0.95) < k  # the guarantee costs a lower threshold
    # coverage is the Beta(k, n + 1 - k) tail: the law of the acceptance rate of the k-th largest
    assert coverage(966, 1000, 0.95) == pytest.approx(stats.beta.sf(0.95, 966, 35))
    assert point_rank(100, 0.95) == 95 and point_rank(3, 0.01) == 1


def test_kth_largest_and_point_threshold_agree_with_the_metric():
    s = np.random.default_rng(0).normal(size=333)
    k = point_rank(s.size, 0.9)
    assert kth_largest(s, k) == threshold_at_tpr(s, 0.9)[0]
    with pytest.raises(ConfigError, match="rank"):
        kth_largest(s, 0)


def test_too_small_sets_are_refused_naming_the_size_needed():
    with pytest.raises(DataError, match="at least 90 are needed"):
        Guarantee.from_scores(np.arange(89.0), 0.95, 0.99)
    Guarantee.from_scores(np.arange(90.0), 0.95, 0.99)
    with pytest.raises(DataError, match="at least 200"):  # the point estimate keeps its rule (10 below it)
        Guarantee.from_scores(np.arange(150.0), 0.95)
    with pytest.raises(DataError, match="NaN"):
        Guarantee.from_scores([np.nan] * 300, 0.95)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="confidence"):
            Guarantee.from_scores(np.arange(300.0), 0.95, bad)


def test_guarantee_with_ties_uses_the_order_statistic_and_stays_valid():
    scores = np.repeat(np.arange(10.0), 30)  # n = 300, ten distinct values
    g = Guarantee.from_scores(scores, 0.9, 0.95)
    assert g.bound_rank == guaranteed_rank(300, 0.9, 0.95)
    assert g.threshold == kth_largest(scores, g.rank)
    assert np.mean(scores >= g.threshold) >= g.rank / 300  # ties only add accepted units


def test_record_roundtrip_and_validation():
    g = Guarantee.from_scores(np.random.default_rng(1).normal(size=500), 0.95, 0.99)
    again = Guarantee.from_dict(g.to_dict())
    assert again.threshold == g.threshold and np.array_equal(again.scores, g.scores)
    rec = g.to_dict()
    assert len(rec["calibration_scores"]["data"]) == math.ceil(4 * 500 / 3) * 4  # base64 float32: compact
    for key, value, match in [("bound_threshold", 0.0, "bound_threshold"), ("tpr", "x", "tpr"),
                              ("confidence", 1.5, "confidence"), ("bound_rank", 3, "bound_rank"),
                              ("coverage", True, "coverage")]:
        with pytest.raises(ConfigError, match=match):
            Guarantee.from_dict({**rec, key: value})
    scores = dict(rec["calibration_scores"])
    for change, match in [({"data": scores["data"][:-8]}, "bytes"), ({"sha256": "0" * 64}, "sha256"),
                          ({"data": "!!"}, "base64"), ({"n": -1}, "positive"), ({"extra": 1}, "exactly")]:
        with pytest.raises(ConfigError, match=match):
            Guarantee.from_dict({**rec, "calibration_scores": {**scores, **change}})
    with pytest.raises(ConfigError, match="exactly the fields"):
        Guarantee.from_dict({**rec, "surprise": 1})
    with pytest.raises(ConfigError, match="exactly the fields"):
        Guarantee.from_dict([1, 2])


# ------------------------------------------------------------------------------------------ simulation


def _acceptance_of_draws(n: int, tpr: float, confidence: float | None, draws: int, seed: int) -> np.ndarray:
    """The true acceptance rate 1 - F(t) of the threshold chosen on each of ``draws`` calibration sets of n
    standard-normal ID scores (through Guarantee.from_scores, as the detector does)."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        t = Guarantee.from_scores(rng.standard_normal(n), tpr, confidence).threshold
        out[i] = stats.norm.sf(t)
    return out


@pytest.mark.parametrize("n", [200, 1000])
def test_guarantee_holds_at_the_stated_rate_and_is_tight(n):
    """Over 4000 calibration draws the acceptance rate is >= 95 % in a share of draws equal to the exact coverage
    (>= 99 %) within sampling error -- and no more: the share is below 99.6 % (the next-less-conservative rank
    falls below 99 %), so the bound is not trivially conservative. The point estimate meets 95 % only about half
    the time."""
    draws, tpr, conf = 4000, 0.95, 0.99
    acc = _acceptance_of_draws(n, tpr, conf, draws, seed=n)
    k = guaranteed_rank(n, tpr, conf)
    assert k is not None
    exact = coverage(k, n, tpr)
    rate = float(np.mean(acc >= tpr))
    se = math.sqrt(exact * (1 - exact) / draws)
    assert abs(rate - exact) < 4 * se, (rate, exact)
    assert rate >= conf - 3 * se and rate < 0.996
    assert coverage(k - 1, n, tpr) < conf  # one rank less and the guarantee fails
    # the lower bound is the 1% quantile of the acceptance rate
    assert np.quantile(acc, 1 - conf) == pytest.approx(acceptance_lower_bound(k, n, conf), abs=0.004)
    point = _acceptance_of_draws(n, tpr, None, 1000, seed=n + 1)
    assert 0.3 < np.mean(point >= tpr) < 0.65
    assert abs(point.mean() - point_rank(n, tpr) / (n + 1)) < 4 * point.std() / math.sqrt(point.size)


def test_guarantee_holds_with_discrete_scores():
    """Scores rounded to a coarse grid (many ties): the share of draws with acceptance >= 90 % is still >= 95 %."""
    rng = np.random.default_rng(7)
    grid = np.linspace(-4, 4, 41)  # scores rounded to 0.2: P(score >= t) is a step function
    tail = stats.norm.sf(grid - 0.1)  # P(round(Z) >= t) for t on the grid
    hits = 0
    draws = 3000
    for _ in range(draws):
        scores = np.round(rng.standard_normal(300) * 5) / 5
        t = Guarantee.from_scores(scores, 0.9, 0.95).threshold
        hits += tail[np.argmin(np.abs(grid - t))] >= 0.9
    assert hits / draws >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / draws)


def test_p_values_of_held_out_id_are_uniform():
    """One held-out ID score per calibration draw (n = 199): its p-value is uniform on {1, ..., 200} / 200; KS
    test against U(0, 1) (discreteness 0.005 is far below the KS tolerance at 5000 draws), and P(p <= a) <= a."""
    rng = np.random.default_rng(11)
    draws, n = 5000, 199
    cal = rng.standard_normal((draws, n))
    test = rng.standard_normal(draws)
    p = np.array([conformal_p_values(cal[i], test[i : i + 1])[0] for i in range(draws)])
    assert stats.kstest(p, "uniform").pvalue > 0.001
    se = math.sqrt(0.25 / draws)
    for a in (0.01, 0.05, 0.1, 0.5):
        assert np.mean(p <= a) <= a + 3 * se
    # and the OOD scores (shifted down) get small p-values
    assert np.median(conformal_p_values(cal[0], rng.standard_normal(500) - 3)) < 0.05


def test_benjamini_hochberg_controls_the_false_discovery_rate():
    """2000 batches of 200 images (10 % OOD, shifted by -2.5), each against its own calibration set of 500: the mean
    false discovery proportion is <= q m0 / m = 0.09 within sampling error, and BH finds most outliers."""
    rng = np.random.default_rng(5)
    batches, m, m_ood, n, q = 2000, 200, 20, 500, 0.1
    fdp, power = np.empty(batches), np.empty(batches)
    for b in range(batches):
        cal = rng.standard_normal(n)
        scores = np.concatenate([rng.standard_normal(m - m_ood), rng.standard_normal(m_ood) - 2.5])
        flagged = benjamini_hochberg(conformal_p_values(cal, scores), q)
        false = int(flagged[: m - m_ood].sum())
        fdp[b] = false / max(1, int(flagged.sum()))
        power[b] = flagged[m - m_ood :].mean()
    bound = q * (m - m_ood) / m
    assert fdp.mean() <= bound + 3 * fdp.std() / math.sqrt(batches), fdp.mean()
    assert fdp.mean() > 0.5 * bound  # not vacuous
    assert power.mean() > 0.2
