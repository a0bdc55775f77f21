"""OOD-detection metrics, computed the way the research field computes them (pure numpy, O(n log n)).

Inputs
------
Every function takes the scores of the in-distribution (ID) test set and of one OOD set, following the
oodtune convention: **higher score = more in-distribution** (e.g. ``-energy``, max softmax).

Positive class
--------------
The literature uses two conventions, and they give different FPR95 values:

* ``positive="out"`` (default) — OOD is the positive class, the one to *detect*. This is what the
  Outlier Exposure code (hendrycks/outlier-exposure, ``CIFAR/test.py``: ``get_measures(out_score,
  in_score)`` on anomaly scores ``-MSP``) and the Balanced Energy code (hyunjunChhoi/Balanced_Energy,
  ``classification/inf_test_SC_*.py``: ``--out_as_pos`` whose default is the truthy string ``'true'``, so
  ``get_measures(out_score, in_score)`` on anomaly scores ``energy``) use; their tables report
  these numbers, so oodtune defaults to it.
  **FPR95** = the fraction of *ID* samples wrongly flagged as OOD at the threshold that flags 95% of the
  *OOD* samples (TPR of OOD fixed at 95%; the reported error is on ID data).
* ``positive="in"`` — ID is the positive class (energy_ood ``test.py`` without ``--out_as_pos``, its
  default; also the "FPR of OOD at 95% TPR of ID" phrasing of Liu et al. 2020).
  **FPR95** = the fraction of *OOD* samples wrongly accepted as ID at the threshold that accepts 95% of
  the *ID* samples (TPR of ID fixed at 95%; the reported error is on OOD data).

Exact definition of FPR at TPR (both conventions): sort by decreasing "positive-ness", form the ROC
operating points with *tied scores as one step* (as ``sklearn.metrics.roc_curve`` does, with the (0, 0)
point prepended) and report, with ``rule="first"`` (default), the smallest FPR among points whose TPR >=
``tpr``; equivalently ``fpr[np.searchsorted(tpr_curve, tpr)]`` on ``sklearn.metrics.roc_curve(...,
drop_intermediate=False)``.

``rule="nearest"`` is the rule of the OE / Balanced Energy helper ``fpr_and_fdr_at_recall``: the operating
point whose TPR is *closest* to ``tpr`` (it may lie below it), and among points equally close the one with
the *largest* FPR (that helper scans from the highest recall down and keeps the first minimiser). The two
rules do not agree "within one sample": when ``tpr`` x #positives is an integer k, "first" stops at the k-th
positive and "nearest" runs on to just before the (k+1)-th, so the FPRs differ by the number of negatives
ranked between those two positives — an amount that grows with the overlap of the two score distributions
(``tests/test_metrics.py`` checks this identity). Measured on ID scores N(1, 1) vs OOD scores N(0, 1), 2,000
each, OOD positive, ``numpy.random.default_rng(seed)`` for seeds 0–19: 0 to 14 samples (median 2), i.e. up to
0.7 FPR95 points. When k is not an integer, "nearest" may also take the point just below ``tpr``.

AUROC = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg): it is the same under both conventions.

AUPR (average precision, ``sklearn.metrics.average_precision_score``: AP = sum_k (R_k - R_{k-1}) P_k over
distinct thresholds, no interpolation):

* **AUPR-In**  — ID is positive, ranked by the score (higher = ID);
* **AUPR-Out** — OOD is positive, ranked by the negated score.

Both are always reported, whatever ``positive`` is. The single "AUPR"/"AP" column of the OE and Balanced
Energy papers is AUPR-Out (their positive class is OOD); ``aupr(..., positive=p)`` returns the AUPR of
the positive class ``p``.

All metrics are fractions in [0, 1]; ``OODMetrics.as_percent()`` gives the percentages papers print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError
from .conformal import kth_largest, point_rank

Positive = Literal["in", "out"]
DEFAULT_POSITIVE: Positive = "out"
POSITIVES: tuple[str, ...] = ("in", "out")
FprRule = Literal["first", "nearest"]
FPR_RULES: tuple[str, ...] = ("first", "nearest")


@dataclass(frozen=True)
class OODMetrics:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``tpr`` TPR (fractions) of one (ID, OOD) pair of score sets.

    ``positive`` and ``tpr`` record the convention under which ``fpr95`` was computed (module docstring).
    """

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr95: float
    positive: str = DEFAULT_POSITIVE
    tpr: float = 0.95

    def as_percent(self) -> dict[str, float]:
        """The four metrics in percent, keyed ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95``."""
        return {k: 100.0 * getattr(self, k) for k in ("auroc", "aupr_in", "aupr_out", "fpr95")}


def metric_convention(positive: str = DEFAULT_POSITIVE, tpr: float = 0.95) -> dict[str, str]:
    """The conventions behind a results table, in words, for results files (module docstring)."""
    _check_positive(positive)
    rule = (f"FPR{round(100 * tpr)} = fraction of ID samples flagged OOD at the threshold that flags {tpr:.0%} of "
            "OOD samples" if positive == "out" else
            f"FPR{round(100 * tpr)} = fraction of OOD samples accepted as ID at the threshold that accepts "
            f"{tpr:.0%} of ID samples")
    return {"positive_class": "OOD" if positive == "out" else "ID", "fpr_rule": rule,
            "scores": "higher = more in-distribution", "aupr": "AUPR-In: ID positive; AUPR-Out: OOD positive",
            "ties": "tied scores form one ROC step (as scikit-learn)"}


# ----------------------------------------------------------------------------- input validation


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores(x: Any, what: str) -> np.ndarray:
    a = _as_array(x)
    if a.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D array of per-sample scores, got shape {a.shape}; "
                         "flatten it (e.g. scores.ravel()) or pass one score per sample.")
    if a.size == 0:
        raise ConfigError(f"{what} is empty; metrics need at least one ID and one OOD score.")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ConfigError(f"{what} must hold real numbers, got dtype {a.dtype}.")
    a = a.astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ConfigError(f"{what} has {int(bad.sum())} NaN/inf value(s) (first at index {int(np.argmax(bad))}); "
                         "the model or score produced non-finite outputs — fix or drop those samples first.")
    return a


def _check_positive(positive: str) -> None:
    if positive not in POSITIVES:
        raise ConfigError(f"positive must be 'in' (ID is the positive class) or 'out' (OOD is positive), "
                         f"got {positive!r}.")


def _check_tpr(tpr: float) -> None:
    if not 0.0 <= tpr <= 1.0:
        raise ConfigError(f"tpr must be in [0, 1] (e.g. 0.95 for FPR95), got {tpr}.")


def _check_rule(rule: str) -> None:
    if rule not in FPR_RULES:
        raise ConfigError(f"rule must be 'first' (smallest FPR with TPR >= tpr) or 'nearest' (the OE code's "
                          f"closest-TPR point), got {rule!r}.")


# ----------------------------------------------------------------------------- the shared sort


def _rates(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from cumulative true / false positive counts, with the (0, 0) start prepended."""
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


@dataclass(frozen=True)
class _Ranked:
    """Per distinct score value, in *decreasing* score order: how many ID and OOD samples hold it."""

    n_id: np.ndarray  # int64 (G,)
    n_ood: np.ndarray  # int64 (G,)
    values: np.ndarray | None = None  # float64 (G,): the distinct scores, decreasing (None: built from counts)

    @classmethod
    def build(cls, id_scores: Any, ood_scores: Any) -> _Ranked:
        s_id = _check_scores(id_scores, "id_scores")
        s_ood = _check_scores(ood_scores, "ood_scores")
        scores = np.concatenate([s_id, s_ood])
        order = np.argsort(-scores, kind="quicksort")  # one O(n log n) sort shared by every metric
        s = scores[order]
        is_id = order < s_id.size
        ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each tie group
        cum_id = np.cumsum(is_id, dtype=np.int64)[ends]
        n_id = np.diff(cum_id, prepend=0)
        n_ood = np.diff(ends + 1 - cum_id, prepend=0)
        return cls(n_id, n_ood, s[ends])

    def counts(self, positive: str) -> tuple[np.ndarray, np.ndarray]:
        """Per tie group, (positives, negatives), ordered from most to least positive-looking."""
        _check_positive(positive)
        if positive == "in":
            return self.n_id, self.n_ood
        return self.n_ood[::-1], self.n_id[::-1]

    def cumulative(self, positive: str) -> tuple[np.ndarray, np.ndarray]:
        """(TP, FP) at each threshold, one threshold per distinct score (ties form one step)."""
        pos, neg = self.counts(positive)
        return np.cumsum(pos), np.cumsum(neg)

    def auroc(self) -> float:
        """Mann-Whitney: P(s_id > s_ood) + 0.5 P(s_id = s_ood), exact in integer arithmetic."""
        ood_below = int(self.n_ood.sum()) - np.cumsum(self.n_ood)
        twice_u = int(np.dot(self.n_id, 2 * ood_below + self.n_ood))
        return twice_u / (2.0 * float(self.n_id.sum()) * float(self.n_ood.sum()))

    def average_precision(self, positive: str) -> float:
        """AP = sum_k (R_k - R_{k-1}) P_k, P_k = TP_k / (TP_k + FP_k), R_k = TP_k / #positives."""
        pos, _ = self.counts(positive)
        tp, fp = self.cumulative(positive)
        return float(np.sum(pos * (tp / (tp + fp))) / tp[-1])

    def thresholds(self, positive: str) -> np.ndarray:
        """Per tie group, the decision threshold in the order of :meth:`counts`: the score itself for "in",
        the negated score (an anomaly score) for "out"; decreasing either way."""
        _check_positive(positive)
        if self.values is None:
            raise ConfigError("thresholds need the scores themselves; these metrics were built from counts only.")
        return self.values if positive == "in" else -self.values[::-1]

    def rates(self, positive: str) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) at each threshold, starting at (0, 0); from the counts alone."""
        return _rates(*self.cumulative(positive))

    def roc(self, positive: str, drop_intermediate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ROC operating points (FPR, TPR, threshold), starting at (0, 0, inf), ties as one step.

        ``drop_intermediate`` removes points lying on a straight segment between their neighbours, with
        scikit-learn's rule (applied to the counts, before (0, 0) is prepended).
        """
        tp, fp = self.cumulative(positive)
        thr = self.thresholds(positive)
        if drop_intermediate and tp.size > 2:
            keep = np.r_[True, (np.diff(tp, 2) != 0) | (np.diff(fp, 2) != 0), True]
            tp, fp, thr = tp[keep], fp[keep], thr[keep]
        return (*_rates(tp, fp), np.r_[np.inf, thr])

    def fpr_at_tpr(self, positive: str, tpr: float, rule: str = "first") -> float:
        """FPR at ``tpr`` TPR: the smallest FPR among operating points whose TPR >= ``tpr`` (``rule="first"``),
        or the FPR of the point whose TPR is closest to ``tpr``, the largest FPR among equally close points
        (``rule="nearest"``, the OE code's rule); see the module docstring."""
        _check_tpr(tpr)
        _check_rule(rule)
        fpr_curve, tpr_curve = self.rates(positive)
        if rule == "first":
            return float(fpr_curve[np.searchsorted(tpr_curve, tpr, side="left")])
        # points after the (0, 0) start, up to the first one that reaches TPR = 1
        last = int(np.searchsorted(tpr_curve, 1.0, side="left"))
        distance = np.abs(tpr_curve[1 : last + 1] - tpr)
        closest = np.flatnonzero(distance == distance.min())
        return float(fpr_curve[1 + closest[-1]])


# ----------------------------------------------------------------------------- public API


def _metrics(r: _Ranked, positive: Positive, tpr: float) -> OODMetrics:
    return OODMetrics(auroc=r.auroc(), aupr_in=r.average_precision("in"), aupr_out=r.average_precision("out"),
                      fpr95=r.fpr_at_tpr(positive, tpr), positive=positive, tpr=tpr)


def ood_metrics(id_scores: Any, ood_scores: Any, *, positive: Positive = DEFAULT_POSITIVE,
                tpr: float = 0.95) -> OODMetrics:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``tpr`` TPR of ``positive`` (see the module docstring).

    Scores: higher = more in-distribution. One argsort is shared by all four metrics.
    """
    _check_positive(positive)
    _check_tpr(tpr)
    return _metrics(_Ranked.build(id_scores, ood_scores), positive, tpr)


def metrics_from_counts(n_id: Any, n_ood: Any, *, positive: Positive = DEFAULT_POSITIVE,
                        tpr: float = 0.95) -> OODMetrics:
    """:func:`ood_metrics` from tie-group counts: ``n_id[g]`` ID and ``n_ood[g]`` OOD samples share the g-th
    distinct score, groups in *decreasing* score order (how a streaming histogram hands over its counts)."""
    _check_positive(positive)
    _check_tpr(tpr)
    a, b = np.asarray(n_id, dtype=np.int64), np.asarray(n_ood, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or (a < 0).any() or (b < 0).any() or ((a + b) == 0).any():
        raise ConfigError("tie-group counts must be two 1-D arrays of the same length, non-negative, and every group "
                          "non-empty.")
    if a.sum() == 0 or b.sum() == 0:
        raise ConfigError("metrics need at least one ID and one OOD sample.")
    return _metrics(_Ranked(a, b), positive, tpr)


#: Keys of :func:`detection_metrics`: FPR95 under both conventions (``fpr95``: OOD positive, ``fpr95_in``: ID
#: positive).
DETECTION_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_in")


def detection_metrics(id_scores: Any, ood_scores: Any, *, tpr: float = 0.95) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``tpr`` TPR under **both** conventions, in percent (one sort).

    ``fpr95``: OOD is positive (OE / Balanced Energy code) — % of ID samples flagged as OOD when ``tpr`` of the
    OOD samples are flagged. ``fpr95_in``: ID is positive (energy_ood / OpenOOD) — % of OOD samples accepted as
    ID when ``tpr`` of the ID samples are accepted. Both with the default ``rule="first"``.
    """
    _check_tpr(tpr)
    r = _Ranked.build(id_scores, ood_scores)
    return {"auroc": 100 * r.auroc(), "aupr_in": 100 * r.average_precision("in"),
            "aupr_out": 100 * r.average_precision("out"), "fpr95": 100 * r.fpr_at_tpr("out", tpr),
            "fpr95_in": 100 * r.fpr_at_tpr("in", tpr)}


def auroc(id_scores: Any, ood_scores: Any, positive: Positive = DEFAULT_POSITIVE) -> float:
    """Area under the ROC curve (= ``sklearn.metrics.roc_auc_score``); identical for both conventions."""
    _check_positive(positive)
    return _Ranked.build(id_scores, ood_scores).auroc()


def aupr(id_scores: Any, ood_scores: Any, positive: Positive = DEFAULT_POSITIVE) -> float:
    """Average precision with ``positive`` as the positive class: AUPR-Out for "out", AUPR-In for "in"."""
    return _Ranked.build(id_scores, ood_scores).average_precision(positive)


def fpr_at_tpr(id_scores: Any, ood_scores: Any, positive: Positive = DEFAULT_POSITIVE, tpr: float = 0.95,
               rule: FprRule = "first") -> float:
    """FPR at ``tpr`` TPR (FPR95 for 0.95): at the first operating point with TPR >= ``tpr`` (``rule="first"``)
    or at the point with the closest TPR, as the OE code does (``rule="nearest"``); see the module docstring."""
    return _Ranked.build(id_scores, ood_scores).fpr_at_tpr(positive, tpr, rule)


def roc_curve(id_scores: Any, ood_scores: Any, positive: Positive = DEFAULT_POSITIVE, *,
              drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, from (0, 0) to (1, 1), ties as one step.

    Matches ``sklearn.metrics.roc_curve(y_true, y_score)`` with ``positive`` as class 1: for "in",
    ``y_score`` is the score; for "out", it is the *negated* score (higher = more anomalous). Point k is
    what the rule "positive when y_score >= thresholds[k]" gives; ``thresholds[0] = inf`` (nothing flagged)
    and ``thresholds`` decrease. ``drop_intermediate`` removes the points that lie on a straight segment
    between their neighbours (same rule as scikit-learn), which keeps plots of 10^5+ scores light without
    changing the curve.
    """
    return _Ranked.build(id_scores, ood_scores).roc(positive, drop_intermediate)


def _check_id_only(id_scores: Any, tpr: float) -> np.ndarray:
    _check_tpr(tpr)
    if not 0.0 < tpr < 1.0:
        raise ConfigError(f"tpr must be strictly between 0 and 1 to place a threshold, got {tpr}.")
    return _check_scores(id_scores, "id_scores")


def threshold_at_tpr(id_scores: Any, tpr: float = 0.95) -> tuple[float, float]:
    """``(threshold, achieved)``: the largest threshold t such that at least ``tpr`` of ``id_scores`` satisfy
    ``score >= t``, and the fraction that does (>= ``tpr``; more when scores tie at t).

    This is the operating point of FPR at ``tpr`` TPR with ID as the positive class (``positive="in"``):
    t = the k-th largest score, k = ceil(tpr * n), i.e. ``thresholds[searchsorted(tpr_curve, tpr)]`` of
    ``sklearn.metrics.roc_curve`` on the ID scores. A sample is then accepted as ID when ``score >= t``.
    """
    s = _check_id_only(id_scores, tpr)
    t = kth_largest(s, point_rank(s.size, tpr))
    return t, float(np.mean(s >= t))


def min_calibration_size(tpr: float, min_rejected: int = 10) -> int:
    """The smallest calibration set for a threshold at ``tpr``: one that leaves at least ``min_rejected``
    samples below the threshold, n >= min_rejected / (1 - tpr) (200 for TPR 95% and the default 10).

    With fewer, the threshold is an extrapolated tail quantile: its acceptance rate on new data has a standard
    error above sqrt(tpr (1 - tpr) / n) ~ 1.5 points at 95% and n = 200, and grows quickly below."""
    _check_id_only(np.zeros(1), tpr)
    return int(np.ceil(min_rejected / (1.0 - tpr) - 1e-9))


def acceptance_rate(scores: Any, threshold: float) -> tuple[float, float]:
    """``(rate, standard_error)``: the fraction of ``scores`` at or above ``threshold`` (the acceptance rate of
    a set of ID samples) and its binomial standard error sqrt(p (1 - p) / n)."""
    s = _check_scores(scores, "scores")
    p = float(np.mean(s >= threshold))
    return p, float(np.sqrt(p * (1.0 - p) / s.size))


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Top-1 accuracy: ``logits_or_preds`` is (N, K) logits (argmax taken) or (N,) predicted labels."""
    out = _as_array(logits_or_preds)
    y = _as_array(labels)
    if y.ndim != 1 or y.size == 0:
        raise ConfigError(f"labels must be a non-empty 1-D array of class indices, got shape {y.shape}.")
    if out.ndim == 2:
        if not np.isfinite(out).all():
            raise ConfigError("logits contain NaN/inf; the model produced non-finite outputs.")
        preds = out.argmax(axis=1)
    elif out.ndim == 1:
        preds = out
    else:
        raise ConfigError(f"expected (N, K) logits or (N,) predictions, got shape {out.shape}.")
    if preds.shape[0] != y.shape[0]:
        raise ConfigError(f"{preds.shape[0]} predictions but {y.shape[0]} labels; pass one label per sample "
                         "(same order as the logits).")
    return float(np.mean(preds == y))
