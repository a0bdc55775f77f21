"""Pixel metrics: the streaming counter against scikit-learn (exact without key collisions, within its reported
bound otherwise), chunking invariance, void handling; mIoU against a hand count; SegmentMeIfYouCan components on
hand-made frames; pixel scores against the per-image scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodtune.metrics.pixel import ConfusionCounter, PixelDetectionCounter, component_metrics, score_keys
from oodtune.scores import build_score, score_map


def _sklearn(scores: np.ndarray, anomaly: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, FPR95) with anomaly positive and -score as the anomaly score."""
    fpr, tpr, _ = roc_curve(anomaly, -scores, drop_intermediate=False)
    return roc_auc_score(anomaly, -scores), average_precision_score(anomaly, -scores), fpr[np.searchsorted(tpr, 0.95)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_with_ties_against_sklearn(seed: int) -> None:
    """Scores on a coarse grid: many exact ties, no two different scores share a key -> exact."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(-40, 40, size=(3, 30, 20)).astype(np.float32) / 4
    anomaly = rng.random((3, 30, 20)) < 0.2
    scores[anomaly] -= 2.0
    counter = PixelDetectionCounter()
    for i in range(3):
        counter.update(scores[i], anomaly[i])
    res = counter.result()
    auroc, ap, fpr = _sklearn(scores.ravel(), anomaly.ravel())
    assert res.auroc_bound >= 0
    assert res.metrics.auroc == pytest.approx(auroc, abs=1e-12)
    assert res.metrics.aupr_out == pytest.approx(ap, abs=1e-12)
    assert res.metrics.fpr95 == pytest.approx(fpr, abs=1e-12)
    assert res.n_anomaly == anomaly.sum() and res.n_inlier == (~anomaly).sum()


def test_continuous_scores_within_the_reported_bound() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=200_000).astype(np.float32)
    anomaly = rng.random(200_000) < 0.1
    scores[anomaly] -= 1.0
    coarse = PixelDetectionCounter(bits=14)
    coarse.update(scores, anomaly)
    res = coarse.result()
    auroc, _, _ = _sklearn(scores, anomaly)
    assert res.auroc_bound > 0
    assert abs(res.metrics.auroc - auroc) <= res.auroc_bound + 1e-12
    fine = PixelDetectionCounter()  # the default resolution
    fine.update(scores, anomaly)
    fine_res = fine.result()
    assert abs(fine_res.metrics.auroc - auroc) <= fine_res.auroc_bound + 1e-12
    assert fine_res.auroc_bound < 1e-4


def test_chunking_buffering_and_void_do_not_change_the_result() -> None:
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(4, 50, 50)).astype(np.float32)
    anomaly = rng.random((4, 50, 50)) < 0.15
    void = rng.random((4, 50, 50)) < 0.1
    whole = PixelDetectionCounter(bits=20)
    whole.update(scores, anomaly, ~void)
    pieces = PixelDetectionCounter(bits=20, buffer_pixels=100)
    for i in range(4):
        pieces.update(scores[i], anomaly[i], ~void[i])
    a, b = whole.result(), pieces.result()
    assert a.metrics == b.metrics
    auroc, ap, _ = _sklearn(scores[~void], anomaly[~void])
    assert a.metrics.auroc == pytest.approx(auroc, abs=a.auroc_bound + 1e-12)
    assert a.metrics.aupr_out == pytest.approx(ap, abs=1e-3)


def test_best_f1_threshold_selects_the_best_pixels() -> None:
    scores = np.array([-3.0, -2.5, -2.0, 1.0, 2.0, 3.0], dtype=np.float32)
    anomaly = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    counter = PixelDetectionCounter()
    counter.update(scores, anomaly)
    res = counter.result()
    assert res.best_f1 == pytest.approx(1.0)
    assert -2.5 <= res.best_f1_threshold < -2.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=2, max_size=50))
def test_score_keys_preserve_order(values: list[float]) -> None:
    a = np.asarray(values, dtype=np.float32)
    keys = score_keys(a, 32 - 4)
    order = np.argsort(a, kind="stable")
    assert (np.diff(keys[order].astype(np.int64)) >= 0).all()
    assert score_keys(np.float32([-0.0]))[0] == score_keys(np.float32([0.0]))[0]


def test_non_finite_scores_and_empty_classes_are_refused() -> None:
    counter = PixelDetectionCounter()
    with pytest.raises(ValueError, match="NaN"):
        counter.update(np.array([np.nan, 1.0]), np.array([True, False]))
    counter.update(np.array([1.0, 2.0]), np.array([False, False]))
    with pytest.raises(ValueError, match="0 anomaly pixels"):
        counter.result()


def test_miou_counts_void_predictions_as_errors() -> None:
    labels = np.array([[0, 0, 1, 1], [2, 2, 9, 9]])  # 9 = void
    pred = np.array([[0, 3, 1, 0], [2, 2, 1, 2]])  # 3 = the extra (void) output
    conf = ConfusionCounter(3, 4, ignore_index=9)
    conf.update(pred, labels)
    # class 0: TP 1, FN 1 (predicted 3), FP 1 (a 1 predicted 0) -> 1/3; class 1: TP 1, FN 1 -> 1/2; class 2: 2/2
    np.testing.assert_allclose(conf.iou(), [1 / 3, 1 / 2, 1.0])
    assert conf.miou() == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert conf.pixel_accuracy() == pytest.approx(4 / 6)


def test_component_metrics_on_hand_made_frames() -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = 1
    labels[12:18, 12:18] = 1
    scores = np.ones((20, 20), np.float32)
    scores[2:8, 2:8] = -1  # exactly the first object
    scores[0:2, 15:20] = -1  # a false component
    res = component_metrics([(scores, labels)], threshold=0.0, min_gt_size=1, min_pred_size=1)
    assert (res.num_gt, res.num_pred) == (2, 2)
    assert res.siou == pytest.approx(0.5)  # 1 for the found object, 0 for the missed one
    assert res.ppv == pytest.approx(0.5)  # the true component 1, the false one 0
    # every threshold: TP 1, FN 1, FP 1 -> F1 = 2 / 4
    assert res.mean_f1 == pytest.approx(0.5)


def test_component_adjustment_ignores_other_objects() -> None:
    """A prediction covering two objects: each object's sIoU excludes the other object's pixels."""
    labels = np.zeros((10, 30), np.uint8)
    labels[2:8, 2:8] = 1
    labels[2:8, 12:18] = 1
    scores = np.ones((10, 30), np.float32)
    scores[2:8, 2:18] = -1
    res = component_metrics([(scores, labels)], threshold=0.0, min_gt_size=1, min_pred_size=1)
    assert res.siou == pytest.approx(36 / (96 - 36))  # |k| / (|pred| - |other object|)
    assert res.ppv == pytest.approx(72 / 96)


@pytest.mark.parametrize("name", ["msp", "maxlogit", "entropy", "energy"])
def test_pixel_scores_equal_the_per_image_scores_on_each_pixel(name: str) -> None:
    logits = torch.randn(2, 5, 3, 4)
    score = build_score(name)
    got = score_map(score, logits, num_classes=4)
    want = score.from_outputs(logits[:, :4].permute(0, 2, 3, 1).reshape(-1, 4), torch.zeros(1)).reshape(2, 3, 4)
    torch.testing.assert_close(got, want)
    for other in ("knn", "klm", "react+energy"):  # features, ID statistics or the final layer: not per pixel
        with pytest.raises(ValueError, match="not a pixel score"):
            score_map(build_score(other), logits)


def test_sparse_and_dense_counts_agree() -> None:
    """Small sets are counted sparsely, larger ones densely; switching midway changes nothing."""
    rng = np.random.default_rng(5)
    scores = (rng.normal(size=20_000) * 10.0 ** rng.integers(-12, 12, size=20_000)).astype(np.float32)
    anomaly = rng.random(20_000) < 0.3
    switching = PixelDetectionCounter(bits=10, buffer_pixels=500)
    for i in range(0, 20_000, 500):
        switching.update(scores[i : i + 500], anomaly[i : i + 500])
    sparse = PixelDetectionCounter(bits=20)
    sparse.update(scores, anomaly)
    exact = PixelDetectionCounter(bits=10)
    exact.update(scores, anomaly)
    assert switching.result().metrics == exact.result().metrics
    assert switching._counts is not None and sparse.result() and sparse._sparse is not None
    auroc, ap, _ = _sklearn(scores, anomaly)
    assert sparse.result().metrics.auroc == pytest.approx(auroc, abs=sparse.result().auroc_bound + 1e-12)


def test_streaming_ap_of_two_anomaly_scores_in_one_key_is_bounded_and_exact_mode_is_exact() -> None:
    """Binning two *anomaly* scores together changes the precision at each of them: the AP bound says so."""
    scores = np.array([0.1, 0.9, 0.3, np.nextafter(np.float32(0.3), np.float32(1))], np.float32)
    anomaly = np.array([False, False, True, True])
    exact_ap = average_precision_score(anomaly, -scores.astype(np.float64))
    assert exact_ap == pytest.approx(0.5 * (1 / 2 + 2 / 3))  # 0.5833
    streaming = PixelDetectionCounter()
    streaming.update(scores, anomaly)
    res = streaming.result()
    assert res.auroc_bound == 0
    assert abs(res.metrics.aupr_out - exact_ap) <= res.ap_bound + 1e-12 and res.ap_bound > 0
    exact = PixelDetectionCounter(exact=True)
    exact.update(scores, anomaly)
    got = exact.result()
    assert got.metrics.aupr_out == pytest.approx(exact_ap, abs=1e-12) and got.ap_bound == got.auroc_bound == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_and_streaming_modes_against_sklearn_on_continuous_float32_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(4, 120, 100)).astype(np.float32)
    anomaly = rng.random((4, 120, 100)) < 0.08
    scores[anomaly] -= 1.5
    valid = rng.random((4, 120, 100)) < 0.95
    auroc, ap, fpr = _sklearn(scores[valid].astype(np.float64), anomaly[valid])
    exact, coarse = PixelDetectionCounter(exact=True), PixelDetectionCounter(bits=12)
    for i in range(4):
        exact.update(scores[i], anomaly[i], valid[i])
        coarse.update(scores[i], anomaly[i], valid[i])
    res = exact.result()
    assert res.metrics.auroc == pytest.approx(auroc, abs=1e-12)
    assert res.metrics.aupr_out == pytest.approx(ap, abs=1e-12)
    assert res.metrics.fpr95 == pytest.approx(fpr, abs=1e-12)
    approx = coarse.result()
    assert approx.ap_bound > 0 and abs(approx.metrics.aupr_out - ap) <= approx.ap_bound + 1e-12
    assert abs(approx.metrics.auroc - auroc) <= approx.auroc_bound + 1e-12


def test_small_ground_truth_instances_are_voided_after_grouping_predictions_as_the_official_code() -> None:
    """A 1-pixel ground-truth instance inside a 7-pixel predicted strip: the official code labels the strip as one
    7-pixel component (kept: >= 5) before voiding the instance (< 2 pixels), so the strip is a false positive."""
    labels = np.zeros((5, 12), np.uint8)
    scores = np.ones((5, 12), np.float32)
    labels[0:2, 9:12] = 1  # a 6-pixel object, found exactly
    scores[0:2, 9:12] = 0.0
    scores[3, 2:9] = 0.0  # the strip, 7 pixels
    labels[3, 5] = 1  # a 1-pixel instance in its middle
    res = component_metrics([(scores, labels)], threshold=0.5, min_gt_size=2, min_pred_size=5)
    assert (res.num_gt, res.num_pred) == (1, 2)
    assert res.siou == pytest.approx(1.0)
    assert res.ppv == pytest.approx(0.5)  # the object 1, the strip (6 pixels left in the ROI, no object) 0
    assert res.mean_f1 == pytest.approx(2 / 3)  # every threshold: TP 1, FN 0, FP 1


def test_miou_under_both_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 classes + 1 extra output (void). Argmax over all outputs: pixels 0 and 3 go to the extra channel, wrong
    for every class; over the classes only: pixel 0 is right, pixel 3 goes to class 0."""
    from types import SimpleNamespace

    import torch

    import oodtune.evaluation.segmentation as pe
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 5.0]]).reshape(1, 3, 1, 4)
    labels = np.array([[[0, 0, 1, 1]]])
    monkeypatch.setattr(pe, "forward_maps", lambda *a, **k: iter([(logits, labels)]))
    net = SimpleNamespace(num_classes=2, num_outputs=3)
    data = SimpleNamespace(num_classes=2, ignore_index=255, name="toy", labels=labels)
    m = pe.segmentation_metrics(net, None, data)  # type: ignore[arg-type]
    assert m["miou"] == pytest.approx(100 * (0 + 1 / 3) / 2) and m["pixel_accuracy"] == pytest.approx(25.0)
    assert m["miou_classes"] == pytest.approx(100 / 3) and m["pixel_accuracy_classes"] == pytest.approx(50.0)
