"""oodtune.metrics against scikit-learn, hand-computed cases, convention symmetry and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from oodtune.errors import ConfigError
from oodtune.metrics import (
    OODMetrics,
    acceptance_rate,
    accuracy,
    aupr,
    auroc,
    detection_metrics,
    fpr_at_tpr,
    min_calibration_size,
    ood_metrics,
    roc_curve,
    threshold_at_tpr,
)

TOL = 1e-6


# ----------------------------------------------------------------------------- scikit-learn references


def _labelled(id_scores, ood_scores, positive):
    """(labels, decision scores) with ``positive`` as class 1 and larger decision = more positive."""
    id_s, ood_s = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    scores = np.r_[id_s, ood_s]
    is_id = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    return (is_id, scores) if positive == "in" else (1 - is_id, -scores)


def sk_fpr_at_tpr(id_scores, ood_scores, positive, tpr=0.95):
    """Reference FPR at TPR: the smallest FPR over all ROC points (ties = one step) with TPR >= ``tpr``."""
    y, s = _labelled(id_scores, ood_scores, positive)
    fpr, tpr_curve, _ = sk.roc_curve(y, s, drop_intermediate=False)
    return float(fpr[tpr_curve >= tpr].min())


def sk_reference(id_scores, ood_scores, positive, tpr=0.95):
    y_in, s_in = _labelled(id_scores, ood_scores, "in")
    y_out, s_out = _labelled(id_scores, ood_scores, "out")
    return {"auroc": sk.roc_auc_score(y_in, s_in), "aupr_in": sk.average_precision_score(y_in, s_in),
                "aupr_out": sk.average_precision_score(y_out, s_out),
                "fpr95": sk_fpr_at_tpr(id_scores, ood_scores, positive, tpr)}


def assert_matches_sklearn(id_scores, ood_scores, positive, tpr=0.95):
    got = ood_metrics(id_scores, ood_scores, positive=positive, tpr=tpr)
    ref = sk_reference(id_scores, ood_scores, positive, tpr)
    for key, value in ref.items():
        assert getattr(got, key) == pytest.approx(value, abs=TOL), key


# ----------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("positive", ["in", "out"])
@pytest.mark.parametrize("seed", range(5))
def test_random_continuous_matches_sklearn(seed, positive):
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.0, rng.integers(50, 3000))
    ood_s = rng.normal(0.0, 1.5, rng.integers(50, 3000))
    assert_matches_sklearn(id_s, ood_s, positive)


@pytest.mark.parametrize("positive", ["in", "out"])
@pytest.mark.parametrize("seed", range(5))
def test_tie_heavy_matches_sklearn(seed, positive):
    rng = np.random.default_rng(100 + seed)
    id_s = rng.integers(0, 6, rng.integers(20, 2000)).astype(float)
    ood_s = rng.integers(0, 4, rng.integers(20, 2000)).astype(float)
    for tpr in (0.5, 0.9, 0.95, 1.0):
        assert_matches_sklearn(id_s, ood_s, positive, tpr)


score_lists = st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0]) | st.floats(-5, 5, width=32),
                       min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(score_lists, score_lists, st.sampled_from(["in", "out"]), st.sampled_from([0.0, 0.3, 0.95, 1.0]))
def test_property_matches_sklearn(id_s, ood_s, positive, tpr):
    assert_matches_sklearn(id_s, ood_s, positive, tpr)


@pytest.mark.parametrize("positive", ["in", "out"])
@pytest.mark.parametrize("drop", [False, True])
def test_roc_curve_matches_sklearn(positive, drop):
    rng = np.random.default_rng(7)
    id_s, ood_s = rng.integers(0, 30, 500).astype(float), rng.integers(0, 25, 400).astype(float)
    fpr, tpr, thr = roc_curve(id_s, ood_s, positive, drop_intermediate=drop)
    ref_fpr, ref_tpr, ref_thr = sk.roc_curve(*_labelled(id_s, ood_s, positive), drop_intermediate=drop)
    np.testing.assert_allclose(fpr, ref_fpr, atol=TOL)
    np.testing.assert_allclose(tpr, ref_tpr, atol=TOL)
    np.testing.assert_array_equal(thr, ref_thr)  # inf first, then the decision scores, as scikit-learn


@pytest.mark.parametrize("positive", ["in", "out"])
def test_roc_thresholds_reproduce_their_operating_points(positive):
    """Point k is the rule "positive when decision score >= thresholds[k]" (decision = -score for OOD)."""
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.integers(0, 12, 200).astype(float), rng.normal(3, 3, 150)
    fpr, tpr, thr = roc_curve(id_s, ood_s, positive, drop_intermediate=False)
    pos, neg = (id_s, ood_s) if positive == "in" else (-ood_s, -id_s)
    for k in range(len(thr)):
        assert tpr[k] == pytest.approx(np.mean(pos >= thr[k])) and fpr[k] == pytest.approx(np.mean(neg >= thr[k]))


# ----------------------------------------------------------------------------- thresholds for a detector


def _sk_threshold(id_s, tpr):
    """scikit-learn's threshold of the first ROC point with TPR >= tpr (ID positive; OOD below everything)."""
    id_s = np.asarray(id_s, float)
    y, s = _labelled(id_s, [id_s.min() - 1.0], "in")
    _, tpr_curve, thr = sk.roc_curve(y, s, drop_intermediate=False)
    return thr[np.searchsorted(tpr_curve, tpr, side="left")]


@settings(max_examples=200, deadline=None)
@given(score_lists, st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.95, 0.99]))
def test_threshold_at_tpr_matches_sklearn(id_s, tpr):
    t, achieved = threshold_at_tpr(id_s, tpr)
    assert t == _sk_threshold(id_s, tpr)
    assert achieved == np.mean(np.asarray(id_s) >= t) >= tpr - 1e-12
    # the largest such threshold: any higher one accepts fewer than tpr of the samples
    higher = np.asarray(id_s)[np.asarray(id_s) > t]
    assert higher.size == 0 or np.mean(np.asarray(id_s) >= higher.min()) < tpr


def test_threshold_hand_cases():
    scores = np.arange(1.0, 101.0)  # 1..100
    assert threshold_at_tpr(scores, 0.95) == (6.0, 0.95)  # 6..100 are 95 samples
    assert threshold_at_tpr(scores, 0.951) == (5.0, 0.96)
    assert threshold_at_tpr([1.0, 2.0, 2.0, 2.0], 0.5) == (2.0, 0.75)  # ties at the threshold all accepted
    with pytest.raises(ConfigError, match="strictly between"):
        threshold_at_tpr(scores, 1.0)


def test_min_calibration_size_and_acceptance():
    assert min_calibration_size(0.95) == 200 and min_calibration_size(0.9) == 100 and min_calibration_size(0.5) == 20
    rate, se = acceptance_rate(np.arange(10.0), 2.0)
    assert rate == 0.8 and se == pytest.approx(np.sqrt(0.8 * 0.2 / 10))


# ----------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("positive", ["in", "out"])
def test_perfect_separation(positive):
    m = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], positive=positive)
    assert (m.auroc, m.aupr_in, m.aupr_out, m.fpr95) == (1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("positive", ["in", "out"])
def test_perfectly_wrong(positive):
    m = ood_metrics([0.0, 1.0], [2.0, 3.0, 4.0], positive=positive)
    assert m.auroc == 0.0 and m.fpr95 == 1.0


@pytest.mark.parametrize("positive", ["in", "out"])
def test_identical_scores_are_chance(positive):
    m = ood_metrics(np.full(30, 0.5), np.full(10, 0.5), positive=positive)
    assert m.auroc == 0.5
    assert m.aupr_in == pytest.approx(30 / 40) and m.aupr_out == pytest.approx(10 / 40)
    assert m.fpr95 == 1.0  # all tied: a single step from (0, 0) to (1, 1)


def test_small_case_by_hand():
    # descending: 0.9 I, 0.8 I, 0.7 O, 0.4 I, 0.3 O
    id_s, ood_s = [0.9, 0.8, 0.4], [0.7, 0.3]
    assert auroc(id_s, ood_s) == pytest.approx(5 / 6)  # 5 of the 6 (ID, OOD) pairs are ordered correctly
    assert aupr(id_s, ood_s, "in") == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert aupr(id_s, ood_s, "out") == pytest.approx((1 + 2 / 3) / 2)
    # ID positive: accepting 95% of 3 ID samples needs all 3 (threshold 0.4) -> OOD 0.7 accepted: 1/2
    assert fpr_at_tpr(id_s, ood_s, "in") == pytest.approx(1 / 2)
    # OOD positive: flagging 95% of 2 OOD needs both (threshold 0.7) -> ID 0.4 flagged too: 1/3
    assert fpr_at_tpr(id_s, ood_s, "out") == pytest.approx(1 / 3)
    assert fpr_at_tpr(id_s, ood_s, "in", tpr=0.6) == 0.0  # 0.9, 0.8 accepted, nothing OOD above 0.8
    assert fpr_at_tpr(id_s, ood_s, "out", tpr=0.0) == 0.0


def test_tied_step_counts_the_whole_group():
    # ID 1.0 x2 and OOD 1.0 x2 are tied: reaching any ID TPR > 0 passes both tied OOD samples at once
    assert fpr_at_tpr([1.0, 1.0], [1.0, 1.0, 0.0, 0.0], "in", tpr=0.5) == pytest.approx(0.5)


def test_default_positive_is_out_and_recorded():
    m = ood_metrics([0.9, 0.8, 0.4], [0.7, 0.3])
    assert m.positive == "out" and m.tpr == 0.95
    assert m.fpr95 == pytest.approx(1 / 3)
    assert m.as_percent() == pytest.approx({"auroc": 500 / 6, "aupr_in": 275 / 3, "aupr_out": 250 / 3,
                                            "fpr95": 100 / 3})
    assert isinstance(m, OODMetrics)


# ----------------------------------------------------------------------------- convention symmetry


@settings(max_examples=100, deadline=None)
@given(score_lists, score_lists)
def test_conventions_are_mirror_images(id_s, ood_s):
    """Swapping the roles of ID and OOD (and negating the scores) swaps the two conventions."""
    neg_ood, neg_id = -np.asarray(ood_s), -np.asarray(id_s)
    a, b = ood_metrics(id_s, ood_s, positive="in"), ood_metrics(neg_ood, neg_id, positive="out")
    assert a.auroc == pytest.approx(b.auroc, abs=1e-12)
    assert a.aupr_in == pytest.approx(b.aupr_out, abs=1e-12)
    assert a.aupr_out == pytest.approx(b.aupr_in, abs=1e-12)
    assert a.fpr95 == pytest.approx(b.fpr95, abs=1e-12)
    assert auroc(id_s, ood_s, "in") == auroc(id_s, ood_s, "out")
    assert aupr(id_s, ood_s, "in") == pytest.approx(a.aupr_in) and aupr(id_s, ood_s, "out") == pytest.approx(a.aupr_out)
    assert ood_metrics(id_s, ood_s, positive="out").aupr_in == a.aupr_in  # AUPRs do not depend on `positive`


def test_accepts_torch_and_lists():
    t_id, t_ood = torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.7, 0.3], dtype=torch.float64)
    assert ood_metrics(t_id, t_ood) == ood_metrics([0.9, 0.8, 0.4], np.array([0.7, 0.3]))


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_logits_and_predictions():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([0, 1, 0, 1]), labels) == 0.75
    assert accuracy(torch.from_numpy(logits).float(), torch.from_numpy(labels)) == 0.75


def test_accuracy_errors():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy(np.zeros((3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="NaN"):
        accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="non-empty"):
        accuracy(np.zeros((0, 4)), np.zeros(0, int))
    with pytest.raises(ValueError, match="logits or"):
        accuracy(np.zeros((2, 3, 4)), np.zeros(2, int))


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(("id_s", "ood_s", "match"), [
    ([], [1.0], "id_scores is empty"),
    ([1.0], [], "ood_scores is empty"),
    ([1.0, np.nan], [0.0], "id_scores has 1 NaN/inf"),
    ([1.0], [0.0, np.inf, -np.inf], "ood_scores has 2 NaN/inf"),
    (np.zeros((2, 2)), [0.0], r"1-D array .* shape \(2, 2\)"),
    ([1.0], np.zeros((3, 1)), r"ood_scores must be a 1-D .*ravel"),
    (["a", "b"], [0.0], "real numbers"),
])
def test_bad_scores_raise(id_s, ood_s, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(id_s, ood_s)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="rule must be 'first'"):
        fpr_at_tpr([1.0], [0.0], rule="closest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive must be 'in'"):
        ood_metrics([1.0], [0.0], positive="ood")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tpr must be in \[0, 1\]"):
        ood_metrics([1.0], [0.0], tpr=95)
    with pytest.raises(ValueError, match="positive"):
        auroc([1.0], [0.0], positive="x")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the OE code's nearest-recall rule


def brute_force_nearest(id_scores, ood_scores, positive, tpr):
    """The nearest-TPR rule by enumeration: for every distinct threshold t (positives = samples at least as
    positive-looking as t), from the highest TPR down, keep the first point with the smallest |TPR - tpr|;
    points past the first one with TPR = 1 do not count."""
    y, s = _labelled(id_scores, ood_scores, positive)
    points = []
    for t in sorted(set(s.tolist())):  # ascending threshold = descending TPR
        flagged = s >= t
        points.append((flagged[y == 1].mean(), flagged[y == 0].mean()))
    first_full = max(i for i, (t_, _) in enumerate(points) if t_ == 1.0)
    points = points[first_full:]
    best = min(abs(t_ - tpr) for t_, _ in points)
    return next(f for t_, f in points if abs(t_ - tpr) == best)


@settings(max_examples=200, deadline=None)
@given(score_lists, score_lists, st.sampled_from(["in", "out"]), st.sampled_from([0.0, 0.3, 0.5, 0.95, 1.0]))
def test_nearest_rule_matches_enumeration(id_s, ood_s, positive, tpr):
    got = fpr_at_tpr(id_s, ood_s, positive, tpr, rule="nearest")
    assert got == pytest.approx(brute_force_nearest(id_s, ood_s, positive, tpr), abs=1e-12)


def test_nearest_rule_by_hand():
    # OOD positive, anomaly order (most OOD-looking first): 0.1 O, 0.2 I, 0.3 O, 0.5 I, 0.6 I, 0.8 O, 0.9 I
    id_s, ood_s = [0.2, 0.5, 0.6, 0.9], [0.1, 0.3, 0.8]
    # TPR 2/3 is reached after 0.3 (1 ID flagged) and stays 2/3 through 0.5 and 0.6 (3 ID flagged)
    assert fpr_at_tpr(id_s, ood_s, "out", tpr=0.7, rule="first") == pytest.approx(3 / 4)  # needs TPR 1 at 0.8
    assert fpr_at_tpr(id_s, ood_s, "out", tpr=0.7, rule="nearest") == pytest.approx(3 / 4)  # 2/3 is closest, last
    assert fpr_at_tpr(id_s, ood_s, "out", tpr=0.6, rule="first") == pytest.approx(1 / 4)
    assert fpr_at_tpr(id_s, ood_s, "out", tpr=0.6, rule="nearest") == pytest.approx(3 / 4)


@pytest.mark.parametrize("positive", ["in", "out"])
@pytest.mark.parametrize("seed", range(5))
def test_nearest_minus_first_is_the_negatives_between_two_positives(seed, positive):
    """With 0.95 x #positives = k an integer and continuous scores, "nearest" runs from the k-th positive to just
    before the (k+1)-th: the FPRs differ by the negatives ranked between them."""
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)
    y, s = _labelled(id_s, ood_s, positive)
    pos_sorted = np.sort(s[y == 1])[::-1]
    k = int(round(0.95 * pos_sorted.size))
    negatives = s[y == 0]
    between = int(np.sum((negatives < pos_sorted[k - 1]) & (negatives > pos_sorted[k])))
    diff = fpr_at_tpr(id_s, ood_s, positive, rule="nearest") - fpr_at_tpr(id_s, ood_s, positive)
    assert diff * negatives.size == pytest.approx(between, abs=1e-9)


def test_detection_metrics_reports_both_conventions_in_percent():
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.normal(1, 1, 700), rng.normal(0, 2, 900)
    both = detection_metrics(id_s, ood_s)
    out, inn = ood_metrics(id_s, ood_s, positive="out"), ood_metrics(id_s, ood_s, positive="in")
    assert both == pytest.approx({**out.as_percent(), "fpr95_in": 100 * inn.fpr95})
    assert both["fpr95"] != pytest.approx(both["fpr95_in"])  # the conventions really differ here
