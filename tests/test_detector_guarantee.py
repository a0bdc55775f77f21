"""The Detector with a guaranteed threshold: both thresholds recorded, conformal p-values per image (uniform on
held-out ID images of a real detector), Benjamini–Hochberg on a batch, the compact calibration scores saved and
validated on load, and detector files without them (older ones) still loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from helpers_training import random_imageset, tiny_net
from oodtune.deploy import Detector
from oodtune.errors import ConfigError
from oodtune.metrics import threshold_at_tpr
from oodtune.metrics.conformal import benjamini_hochberg, conformal_p_values, guaranteed_rank, kth_largest

CLASSES = ("c0", "c1", "c2", "c3")


def make_detector(seed: int = 0, resolution: int = 8) -> Detector:
    return Detector(tiny_net(seed), classes=CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=resolution,
                    device="cpu")


@pytest.fixture(scope="module")
def guaranteed() -> tuple[Detector, np.ndarray]:
    det = make_detector()
    images = random_imageset(400, size=8, seed=1)
    det.calibrate(images, tpr=0.9, confidence=0.95)
    return det, det.score(images)


def test_both_thresholds_are_recorded_and_the_bound_is_used(guaranteed):
    det, scores = guaranteed
    g, cal = det.guaranteed(), det.calibrated()
    k = guaranteed_rank(400, 0.9, 0.95)
    assert k is not None and g.bound_rank == k and cal.threshold == g.bound_threshold == kth_largest(scores, k)
    assert g.point_threshold == threshold_at_tpr(scores, 0.9)[0] and g.bound_threshold < g.point_threshold
    assert cal.achieved == np.mean(scores >= cal.threshold) and cal.expected == pytest.approx(k / 401)
    assert g.coverage >= 0.95 and g.acceptance_lower_bound >= 0.9
    assert "guaranteed: threshold" in g.summary() and "point estimate" in g.summary()


def test_p_values_and_fdr_in_predict(guaranteed):
    det, scores = guaranteed
    images = random_imageset(50, size=8, seed=9)
    pred = det.predict(images)
    assert pred.p_values is not None
    np.testing.assert_allclose(pred.p_values, conformal_p_values(scores, pred.scores))
    assert pred.rows()[0]["p_value"] == pytest.approx(float(pred.p_values[0]))
    flagged = det.predict(images, fdr=0.2)
    assert flagged.is_ood is not None
    np.testing.assert_array_equal(flagged.is_ood, benjamini_hochberg(pred.p_values, 0.2))


def test_p_values_of_held_out_id_images_are_uniform():
    """Real detector scores of 6000 ID images (one forward pass), split at random 3000 times into 299 calibration
    images and one held-out image: its p-values are uniform (KS) -- exchangeability is all that is needed."""
    det = make_detector(seed=2)
    scores = det.score(random_imageset(6000, size=8, seed=3))
    rng = np.random.default_rng(0)
    p = np.empty(3000)
    for i in range(p.size):
        pick = rng.choice(scores.size, 300, replace=False)
        p[i] = conformal_p_values(scores[pick[1:]], scores[pick[:1]])[0]
    assert stats.kstest(p, "uniform").pvalue > 0.001
    assert np.mean(p <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / p.size)


def test_saved_scores_round_trip_and_edits_are_refused(guaranteed, tmp_path):
    det, scores = guaranteed
    path = det.save(tmp_path / "det.json")
    again = Detector.load(path, det.net.model, device="cpu")
    assert again.guaranteed().threshold == det.threshold
    np.testing.assert_array_equal(again.guaranteed().scores, np.sort(scores))
    record = json.loads(path.read_text())
    for edit, match in [(lambda r: r["calibration"].update(threshold=r["calibration"]["threshold"] - 1),
                         "does not match"),
                        (lambda r: r["guarantee"].update(point_threshold=0.5), "point_threshold"),
                        (lambda r: r["guarantee"]["calibration_scores"].update(sha256="0" * 64), "sha256"),
                        (lambda r: r["guarantee"].pop("coverage"), "exactly the fields")]:
        broken = json.loads(json.dumps(record))
        edit(broken)
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=match):
            Detector.load(tmp_path / "bad.json", det.net.model, device="cpu")


def test_detector_files_without_scores_load_but_have_no_p_values(guaranteed, tmp_path):
    det, _ = guaranteed
    record = json.loads(det.save(tmp_path / "det.json").read_text())
    del record["guarantee"]
    (tmp_path / "old.json").write_text(json.dumps(record))
    old = Detector.load(tmp_path / "old.json", det.net.model, device="cpu")
    pred = old.predict(random_imageset(5, size=8, seed=4))
    assert pred.p_values is None and pred.is_ood is not None and pred.rows()[0]["p_value"] is None
    with pytest.raises(ConfigError, match="calibrate it again"):
        old.predict(random_imageset(5, size=8, seed=4), fdr=0.1)
