"""Leak-free hyperparameter selection: the rule, and that statistics only ever come from ID *train* data."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from oodtune.data.imageset import ImageSet
from oodtune.data.tensors import Normalizer
from oodtune.errors import DataError, ScoreError
from oodtune.evaluation.classification import Validation, compute_outputs, evaluate
from oodtune.metrics import auroc
from oodtune.models import FeatureModel
from oodtune.scores import KNN, Energy, LogitScore, Score, build_score
from oodtune.scores.selection import RULE, select_hyperparameters


class Shift(LogitScore):
    """A toy score whose validation AUROC is set by its hyperparameter."""

    name = "shift"
    grid: ClassVar[dict[str, tuple[Any, ...]]] = {"a": (1, 2, 3, 4)}

    def __init__(self, a: int = 1) -> None:
        self.a = a

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]


def _fake_validate(aurocs: dict[int, float | None]):
    """validate(candidate) giving ID/outlier scores with the requested AUROC (None: the candidate fails)."""
    def validate(candidate: Score) -> tuple[np.ndarray, np.ndarray]:
        target = aurocs[candidate.a]
        if target is None:
            raise ScoreError(f"cannot fit a={candidate.a}")
        n_above = round(target * 100)  # 1 ID score vs 100 outliers: AUROC = fraction of outliers below it
        return np.array([0.5]), np.r_[np.zeros(n_above), np.ones(100 - n_above)]
    return validate


def test_rule_picks_highest_auroc_ties_go_to_the_default_then_grid_order():
    chosen, sel = select_hyperparameters(Shift(), 8, _fake_validate({1: 0.5, 2: 0.7, 3: 0.9, 4: 0.8}))
    assert chosen.a == 3 and sel.chosen == {"a": 3} and sel.default == {"a": 1} and sel.rule == RULE
    assert [t["auroc"] for t in sel.tried] == pytest.approx([50, 70, 90, 80])
    chosen, _ = select_hyperparameters(Shift(), 8, _fake_validate({1: 0.9, 2: 0.9, 3: 0.5, 4: 0.9}))
    assert chosen.a == 1  # tie with the default: the default
    chosen, _ = select_hyperparameters(Shift(a=4), 8, _fake_validate({1: 0.6, 2: 0.9, 3: 0.9, 4: 0.5}))
    assert chosen.a == 2  # tie between non-defaults: grid order


def test_failing_candidates_are_recorded_not_hidden():
    chosen, sel = select_hyperparameters(Shift(), 8, _fake_validate({1: 0.6, 2: None, 3: 0.7, 4: None}))
    assert chosen.a == 3
    assert [t.get("error") for t in sel.tried] == [None, "cannot fit a=2", None, "cannot fit a=4"]
    with pytest.raises(ScoreError, match="no hyperparameter setting of shift"):
        select_hyperparameters(Shift(), 8, _fake_validate(dict.fromkeys((1, 2, 3, 4))))


def test_scores_without_hyperparameters_are_left_alone():
    score = build_score("msp")
    chosen, sel = select_hyperparameters(score, 8, lambda c: pytest.fail("nothing to validate"))
    assert chosen is score and sel.tried == [] and sel.chosen == sel.default == {}


# ----------------------------------------------------------------------------- through evaluate, with spies


def _images(n: int, seed: int, bright: float, labelled: bool = True) -> ImageSet:
    rng = np.random.default_rng(seed)
    imgs = np.clip(rng.normal(bright, 40, size=(n, 8, 8, 3)), 0, 255).astype(np.uint8)
    labels = (np.arange(n) % 3).astype(np.int64) if labelled else None
    return ImageSet(imgs, labels, ("a", "b", "c") if labelled else (), f"set{seed}")


def _net() -> FeatureModel:
    torch.manual_seed(0)
    return FeatureModel(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))).eval()


class SpyKNN(KNN):
    """kNN that records the features of every ``fit`` call (shared by the copies selection makes)."""

    fits: ClassVar[list[torch.Tensor]] = []

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> SpyKNN:
        SpyKNN.fits.append(features.clone())
        return super().fit(logits, features, labels)


def _rows(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in t.tolist()}


@pytest.mark.parametrize("select", [False, True])
def test_statistics_only_ever_come_from_id_train(select):
    net, norm = _net(), Normalizer()
    id_train, id_test = _images(60, 0, 120), _images(30, 1, 120)
    ood = {"far": _images(20, 2, 30, labelled=False)}
    outliers = _images(25, 3, 220, labelled=False)
    holdout = np.arange(0, 60, 4)  # 15 held-out ID train images
    SpyKNN.fits.clear()
    score = SpyKNN(k=5)
    report = evaluate(net, norm, id_test, ood, [score, Energy()], id_train=id_train, device="cpu",
                      validation=Validation(holdout, outliers) if select else None)
    train = compute_outputs(net, id_train, norm, device="cpu").features
    kept = torch.from_numpy(np.setdiff1d(np.arange(60), holdout))
    others = [compute_outputs(net, ds, norm, device="cpu").features for ds in (id_test, ood["far"], outliers)]
    if select:  # one fit per grid setting on train minus the held-out rows, then the final fit on all of it
        tried = report.selections["knn"]["tried"]
        assert [t["k"] for t in tried] == [5, 50, 1, 10, 20, 100, 200]  # the current setting first
        sel = report.selections["knn"]
        finals = 1 + (sel["chosen"] != sel["default"])  # the chosen setting, and the default for default_rows
        assert len(SpyKNN.fits) == len(tried) + finals
        assert all(torch.equal(f, train[kept]) for f in SpyKNN.fits[: len(tried)])
        assert all(torch.equal(f, train) for f in SpyKNN.fits[len(tried):])
        assert {t["k"] for t in tried if "error" in t} == {50, 100, 200}  # more neighbours than the 45 fit points
        best = max((t for t in tried if "auroc" in t), key=lambda t: t["auroc"])
        assert report.selections["knn"]["chosen"] == {"k": best["k"]}
        assert report.selections["energy"]["chosen"]["temperature"] in Energy.grid["temperature"]
    else:
        assert len(SpyKNN.fits) == 1 and report.selections == {}
    assert torch.equal(SpyKNN.fits[-1], train)  # the scores that are reported use all of ID train
    for f in SpyKNN.fits:
        for other in others:
            assert not (_rows(f) & _rows(other)), "a fit saw test, OOD or outlier features"
    assert score._bank is None  # the caller's object is not fitted; evaluate works on copies


def test_selected_setting_is_what_gets_reported():
    net, norm = _net(), Normalizer()
    id_train, id_test = _images(60, 0, 120), _images(30, 1, 120)
    ood = {"far": _images(20, 2, 30, labelled=False)}
    outliers = _images(25, 3, 220, labelled=False)
    report = evaluate(net, norm, id_test, ood, [build_score("knn")], id_train=id_train, device="cpu",
                      validation=Validation(np.arange(10), outliers))
    k = report.selections["knn"]["chosen"]["k"]
    out = {n: compute_outputs(net, ds, norm, device="cpu") for n, ds in (("tr", id_train), ("id", id_test),
                                                                          ("far", ood["far"]))}
    ref = KNN(k=k).fit(out["tr"].logits, out["tr"].features)
    s_id = ref.from_outputs(out["id"].logits, out["id"].features).numpy()
    s_far = ref.from_outputs(out["far"].logits, out["far"].features).numpy()
    assert report.rows[0]["auroc"] == pytest.approx(100 * auroc(s_id, s_far))
    default = KNN(k=50).fit(out["tr"].logits, out["tr"].features)  # the paper default, refitted on all of train
    d_id = default.from_outputs(out["id"].logits, out["id"].features).numpy()
    d_far = default.from_outputs(out["far"].logits, out["far"].features).numpy()
    assert report.default_rows[0]["score"] == "knn"
    assert report.default_rows[0]["auroc"] == pytest.approx(100 * auroc(d_id, d_far))
    assert (report.default_rows == report.rows) == (k == 50)


@pytest.mark.parametrize("holdout", [np.array([], dtype=int), np.arange(60), np.array([3, 99])])
def test_bad_holdout_is_refused(holdout):
    with pytest.raises(DataError, match="validation hold-out"):
        evaluate(_net(), Normalizer(), _images(30, 1, 120), {"far": _images(20, 2, 30, False)}, [build_score("knn")],
                 id_train=_images(60, 0, 120), device="cpu", validation=Validation(holdout, _images(5, 3, 9, False)))


def test_selection_needs_the_train_split():
    with pytest.raises(DataError, match="hyperparameter selection need"):
        evaluate(_net(), Normalizer(), _images(30, 1, 120), {"far": _images(20, 2, 30, False)}, [build_score("msp")],
                 device="cpu", validation=Validation(np.arange(3), _images(5, 3, 9, False)))


class Scaled(LogitScore):
    """A user's own score whose constructor argument is not stored under its own name."""

    name = "scaled-maxlogit"

    def __init__(self, factor: float) -> None:
        self._factor = factor

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self._factor * logits.amax(dim=1)


def test_user_scores_without_a_grid_work_with_and_without_selection():
    net, norm = _net(), Normalizer()
    args = (net, norm, _images(30, 1, 120), {"far": _images(20, 2, 30, labelled=False)}, [Scaled(2.0)])
    plain = evaluate(*args, device="cpu")
    selected = evaluate(*args, id_train=_images(60, 0, 120), device="cpu",
                        validation=Validation(np.arange(10), _images(25, 3, 220, labelled=False)))
    assert plain.rows == selected.rows == selected.default_rows
    assert selected.selections["scaled-maxlogit"]["tried"] == []
