"""Pixel-wise metrics of anomaly segmentation and semantic segmentation, streaming with bounded memory.

**Detection** (:class:`PixelDetectionCounter`): AUROC, AP and FPR95 pooled over every pixel of a data set, void
pixels ignored, in oodtune's conventions (:mod:`oodtune.metrics.ood`: scores are "higher = more
in-distribution", the anomaly pixels are the positive class of AP = AUPR-Out and of FPR95 by default). A data set
can hold 10^8-10^10 pixels, so scores are not kept: each pixel's float32 score is mapped to an order-preserving
integer key (the IEEE-754 bits with the sign folded) truncated to its top ``bits`` bits, and the pixels of each
class are counted per key. Pixels that share a key are treated as one tie group, exactly as equal scores are
(tied scores form one ROC step and count one half in AUROC). AUROC and FPR95 are therefore **exact** whenever no
key holds an anomaly and an inlier pixel with *different* scores; otherwise AUROC is off by at most

    |ΔAUROC| ≤ ½ · Σ_b n_in(b) · n_out(b) / (N_in · N_out)     (``auroc_bound``, reported with every result)

AP is **not** exact even then: two *anomaly* pixels of different scores in one key share one precision (that of
the whole group) instead of each having its own. With T anomaly and F inlier pixels in the keys below key b
(more anomalous), n = n_out(b) and m = n_in(b), the precision at each anomaly pixel of b lies between
(T + k) / (T + F + m + k) (its k-th anomaly, every inlier of b before it) and (T + n) / (T + F + n) (all of b's
anomalies tied, before its inliers), so

    AP_lo = Σ_b [n - (F + m)(ψ(D + n + 1) - ψ(D + 1))] / N_out ≤ AP ≤ Σ_b n (T + n) / (T + F + n) / N_out,
    D = T + F + m

(ψ: digamma, the closed form of Σ_k 1 / (D + k)); ``ap_bound`` = max(AP_hi - AP, AP - AP_lo) is reported beside
``auroc_bound``. With the default 24 bits a key spans a relative score range of 2⁻¹⁵ (e.g. 3e-4 at energy −10).
Memory: two int64 counters per key (2·2²⁴·8 B = 256 MiB, twice that while merging) plus a buffer of at most
``buffer_pixels`` uint32 keys (64 MiB), whatever the data set's size; while a set's pixels are fewer than 1/16 of
the counters, only the occupied keys are kept (sorted), so small sets cost little.

``exact=True`` keys every pixel by its full float32 score (32 bits, no truncation) and counts the occupied keys
only: every metric is then exact (both bounds 0), at a memory cost of 16 bytes per distinct (score, class) pair --
for sets whose pixels fit in memory. Tests compare both modes with scikit-learn.

**Segmentation** (:class:`ConfusionCounter`): the confusion matrix of labelled pixels (void ignored) against the
argmax over *all* output channels, so a prediction of an extra channel (void / abstention) on a labelled pixel is
an error. IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU is their mean over the classes that occur (in the labels or
the predictions); pixel accuracy = Σ TP / labelled pixels.

**Components** (:func:`component_metrics`): the SegmentMeIfYouCan component-level metrics (Chan et al., NeurIPS
2021 datasets track): the anomaly score is thresholded at the pixel-level threshold of best F1, anomaly
connected components (8-connectivity) are compared with predicted ones, in the order of their code: predicted
components are grouped on the non-void pixels first (and those smaller than ``min_pred_size`` dropped), *then*
ground-truth components smaller than ``min_gt_size`` become void, and both are restricted to the remaining
pixels: sIoU(k) = |k ∩ K̂(k)| / |(k ∪ K̂(k)) \\ A(k)|
per ground-truth component k (K̂(k): predicted components touching k; A(k): pixels of other ground-truth
components), PPV(k̂) = |k̂ ∩ K(k̂)| / |k̂| per predicted component, and the F1 of TP = #{sIoU ≥ τ}, FN = #{sIoU < τ},
FP = #{PPV < τ} averaged over τ = 0.25, 0.30, ..., 0.75 ("mean F1"). Their anomaly track uses 100 / 500 pixels
at 2048x1024 for ``min_gt_size`` / ``min_pred_size``; we scale them by the evaluated pixel count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .ood import DEFAULT_POSITIVE, OODMetrics, Positive, metrics_from_counts

__all__ = ["ComponentMetrics", "ConfusionCounter", "PixelDetectionCounter", "PixelMetrics", "ap_range",
           "component_metrics", "score_keys"]

DEFAULT_BITS = 24


def score_keys(scores: np.ndarray, bits: int = DEFAULT_BITS) -> np.ndarray:
    """Order-preserving uint32 keys of float32 ``scores``, truncated to their top ``bits`` bits (a larger score
    never gets a smaller key; equal scores get equal keys, -0.0 and +0.0 included)."""
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    flip = (s.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)  # negative: all bits, else the sign
    return (s.view(np.uint32) ^ flip) >> np.uint32(32 - bits)


@dataclass(frozen=True)
class PixelMetrics:
    """Detection metrics of one data set's pixels (fractions) with their size and the AUROC error bound."""

    metrics: OODMetrics
    n_inlier: int
    n_anomaly: int
    auroc_bound: float  # max |AUROC - exact AUROC| from pixels sharing a key (0 = exact)
    ap_bound: float  # max |AP - exact AP| (AP = AUPR-Out, anomaly positive) from pixels sharing a key (0 = exact)
    best_f1_threshold: float  # score at which the anomaly pixel F1 is highest (pixels with score <= it: anomaly)
    best_f1: float


class PixelDetectionCounter:
    """Streams (score map, anomaly mask, valid mask) batches into per-key pixel counts (module docstring)."""

    def __init__(self, bits: int = DEFAULT_BITS, buffer_pixels: int = 1 << 24, *, exact: bool = False) -> None:
        if not 8 <= bits <= 28:
            raise ConfigError(f"bits must be in [8, 28], got {bits}")
        self.exact = exact
        self.bits = 32 if exact else bits  # exact: full float32 keys, occupied keys only (module docstring)
        self.buffer_pixels = int(buffer_pixels)
        self._counts: np.ndarray | None = None  # dense (2 ** (bits + 1),) int64, index key * 2 + is_anomaly
        self._sparse: tuple[np.ndarray, np.ndarray] | None = None  # (occupied indices, counts) while small
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def update(self, scores: np.ndarray, anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add the pixels of ``scores`` (higher = more in-distribution) with their ``anomaly`` flags; pixels where
        ``valid`` is False (void) are skipped. All three have the same shape."""
        scores, anomaly = np.asarray(scores), np.asarray(anomaly, dtype=bool)
        if scores.shape != anomaly.shape or (valid is not None and np.shape(valid) != scores.shape):
            raise ConfigError(f"score map {scores.shape}, anomaly mask {anomaly.shape} and valid mask "
                              f"{None if valid is None else np.shape(valid)} must have the same shape.")
        if valid is not None:
            keep = np.asarray(valid, dtype=bool)
            scores, anomaly = scores[keep], anomaly[keep]
        scores = scores.ravel().astype(np.float32, copy=False)
        if not np.isfinite(scores).all():
            raise ConfigError("pixel scores contain NaN/inf; the model produced non-finite outputs.")
        keys = score_keys(scores, self.bits)
        if self.exact:  # 33-bit packed keys
            packed = (keys.astype(np.uint64) << np.uint64(1)) | anomaly.ravel().astype(np.uint64)
        else:
            packed = (keys << np.uint32(1)) | anomaly.ravel()
        self._buffer.append(packed)
        self._buffered += packed.size
        if self._buffered >= self.buffer_pixels:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        size = 2 ** (self.bits + 1)
        packed = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        if self._counts is None and (self.exact or packed.size * 16 <= size):  # count the occupied keys only
            keys, counts = np.unique(packed, return_counts=True)
            if self._sparse is not None:
                keys, inverse = np.unique(np.concatenate([self._sparse[0], keys]), return_inverse=True)
                counts = np.bincount(inverse, weights=np.concatenate([self._sparse[1], counts])).astype(np.int64)
            self._sparse = (keys, counts)
            if not self.exact and keys.size * 16 > size:  # grown large: switch to dense counters
                self._densify(size)
            return
        if self._counts is None:
            self._densify(size)
        self._counts += np.bincount(packed, minlength=size)  # type: ignore[operator]

    def _densify(self, size: int) -> None:
        """Dense counters (holding the sparse counts so far)."""
        self._counts = np.zeros(size, dtype=np.int64)
        if self._sparse is not None:
            self._counts[self._sparse[0]] = self._sparse[1]
            self._sparse = None

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, inlier count, anomaly count) of the occupied keys, in *decreasing* score order."""
        self._flush()
        if self._sparse is not None:
            index, counts = self._sparse
            keys = np.unique(index >> 1)[::-1]
            n_in, n_out = np.zeros(keys.size, np.int64), np.zeros(keys.size, np.int64)
            pos = keys.size - 1 - np.searchsorted(keys[::-1], index >> 1)
            np.add.at(n_in, pos[(index & 1) == 0], counts[(index & 1) == 0])
            np.add.at(n_out, pos[(index & 1) == 1], counts[(index & 1) == 1])
            return keys, n_in, n_out
        if self._counts is None:
            raise ConfigError("no pixels were counted; evaluate at least one frame with labelled pixels.")
        pairs = self._counts.reshape(-1, 2)
        occupied = np.flatnonzero(pairs.any(axis=1))[::-1]
        return occupied, pairs[occupied, 0], pairs[occupied, 1]

    def upper_edge(self, key: int) -> float:
        """The largest float32 score whose key is ``key``: ``score <= upper_edge(k)`` selects every pixel of keys
        up to ``k``."""
        high = np.uint32(((int(key) << (32 - self.bits)) | ((1 << (32 - self.bits)) - 1)) & 0xFFFFFFFF)
        raw = high & np.uint32(0x7FFFFFFF) if high & np.uint32(0x80000000) else ~high
        value = float(np.asarray(raw, dtype=np.uint32).view(np.float32))
        return value if np.isfinite(value) else float(np.finfo(np.float32).max)

    def result(self, *, positive: Positive = DEFAULT_POSITIVE, tpr: float = 0.95) -> PixelMetrics:
        """AUROC, AUPR-In, AUPR-Out (= AP, anomaly positive) and FPR at ``tpr`` over every counted pixel."""
        keys, n_in, n_out = self.counts()
        total_in, total_out = int(n_in.sum()), int(n_out.sum())
        if total_in == 0 or total_out == 0:
            raise ConfigError(f"pixel metrics need inlier and anomaly pixels, got {total_in} inlier and {total_out} "
                              "anomaly pixels; is this an anomaly set (labels 0 / 1 / 255)?")
        metrics = metrics_from_counts(n_in, n_out, positive=positive, tpr=tpr)
        bound = 0.5 * float(np.dot(n_in.astype(np.float64), n_out)) / (float(total_in) * float(total_out))
        ap_low, ap_high = ap_range(n_in, n_out)
        ap_bound = 0.0 if self.exact else max(ap_high - metrics.aupr_out, metrics.aupr_out - ap_low, 0.0)
        # best pixel F1 with anomaly positive: thresholds run from the most anomalous (lowest score) key up
        tp, fp = np.cumsum(n_out[::-1]), np.cumsum(n_in[::-1])
        f1 = 2 * tp / (tp + fp + total_out)
        best = int(np.argmax(f1))
        return PixelMetrics(metrics, total_in, total_out, 0.0 if self.exact else bound, ap_bound,
                            self.upper_edge(int(keys[::-1][best])), float(f1[best]))


def ap_range(n_in: np.ndarray, n_out: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) exact AP (anomaly positive) of pixels counted per key, ``n_in`` / ``n_out`` in decreasing
    score order, whatever the scores inside each key (module docstring)."""
    from scipy.special import digamma

    m, n = n_in[::-1].astype(np.float64), n_out[::-1].astype(np.float64)  # most anomalous key first
    t = np.cumsum(n) - n  # anomalies in the keys before
    f = np.cumsum(m) - m  # inliers in the keys before
    total = float(n.sum())
    high = float(np.sum(np.divide(n * (t + n), t + f + n, out=np.zeros_like(n), where=n > 0))) / total
    d = t + f + m
    low = float(np.sum(n - (f + m) * (digamma(d + n + 1) - digamma(d + 1)))) / total
    return low, high


class ConfusionCounter:
    """Streams (prediction, label) maps into a (num_classes, num_outputs) confusion matrix (module docstring)."""

    def __init__(self, num_classes: int, num_outputs: int, ignore_index: int | None) -> None:
        if num_outputs < num_classes:
            raise ConfigError(f"num_outputs ({num_outputs}) must be >= num_classes ({num_classes}).")
        self.num_classes, self.num_outputs, self.ignore_index = num_classes, num_outputs, ignore_index
        self.matrix = np.zeros((num_classes, num_outputs), dtype=np.int64)

    def update(self, prediction: np.ndarray, labels: np.ndarray) -> None:
        """``prediction``: argmax channel per pixel; ``labels``: class per pixel (the ignore value skipped)."""
        pred, lab = np.asarray(prediction).ravel().astype(np.int64), np.asarray(labels).ravel().astype(np.int64)
        if pred.shape != lab.shape:
            raise ConfigError(f"prediction has {pred.size} pixels but labels {lab.size}.")
        keep = lab != self.ignore_index if self.ignore_index is not None else np.ones(lab.shape, bool)
        if (lab[keep] >= self.num_classes).any() or (lab[keep] < 0).any():
            raise ConfigError(f"labels outside 0..{self.num_classes - 1} (void {self.ignore_index}).")
        self.matrix += np.bincount(lab[keep] * self.num_outputs + pred[keep],
                                   minlength=self.num_classes * self.num_outputs).reshape(self.matrix.shape)

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN for a class with neither labelled nor predicted pixels)."""
        tp = np.diag(self.matrix[:, : self.num_classes]).astype(np.float64)
        fn = self.matrix.sum(1) - tp
        fp = self.matrix[:, : self.num_classes].sum(0) - tp
        union = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        return float(np.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix[:, : self.num_classes]) / total) if total else float("nan")


@dataclass(frozen=True)
class ComponentMetrics:
    """SegmentMeIfYouCan component metrics (fractions): mean sIoU over ground-truth components, mean PPV over
    predicted components, mean F1 over the sIoU thresholds, and the pixel threshold used."""

    siou: float
    ppv: float
    mean_f1: float
    threshold: float
    num_gt: int
    num_pred: int


SIOU_THRESHOLDS = np.linspace(0.25, 0.75, 11)


def _frame_components(score: np.ndarray, labels: np.ndarray, threshold: float, min_gt: int,
                      min_pred: int) -> tuple[list[float], list[float]]:
    """(sIoU per ground-truth component, PPV per predicted component) of one frame."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=bool)
    roi = labels != 255
    pred, n_pred = ndimage.label((score <= threshold) & roi, structure)  # grouped before small objects are voided
    if n_pred:
        sizes = np.bincount(pred.ravel(), minlength=n_pred + 1)
        small = np.flatnonzero(sizes < min_pred)
        pred[np.isin(pred, small[small > 0])] = 0
    gt, n_gt = ndimage.label(labels == 1, structure)
    if n_gt:
        sizes = np.bincount(gt.ravel(), minlength=n_gt + 1)
        small = np.flatnonzero(sizes < min_gt)
        small = small[small > 0]
        if small.size:
            roi &= ~np.isin(gt, small)
            gt[np.isin(gt, small)] = 0
    gt, pred = gt[roi], pred[roi]
    sious, ppvs = [], []
    for k in np.unique(gt[gt > 0]):
        in_k = gt == k
        touching = np.unique(pred[in_k & (pred > 0)])
        covered = np.isin(pred, touching)
        inter = int((in_k & covered).sum())
        adjustment = int((covered & (gt > 0) & ~in_k).sum())
        sious.append(inter / (int(covered.sum()) + int(in_k.sum()) - inter - adjustment))
    for k in np.unique(pred[pred > 0]):
        in_k = pred == k
        ppvs.append(float((in_k & (gt > 0)).sum()) / float(in_k.sum()))
    return sious, ppvs


def component_metrics(frames: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float, *,
                      min_gt_size: int = 100, min_pred_size: int = 500) -> ComponentMetrics:
    """SegmentMeIfYouCan component metrics over ``frames`` = (score map, labels 0/1/255) pairs; scores are
    "higher = more in-distribution", so a pixel is predicted anomalous when its score is <= ``threshold`` (e.g.
    :attr:`PixelMetrics.best_f1_threshold`); see the module docstring."""
    sious: list[float] = []
    ppvs: list[float] = []
    for score, labels in frames:
        s, p = _frame_components(np.asarray(score), np.asarray(labels), threshold, min_gt_size, min_pred_size)
        sious += s
        ppvs += p
    s_arr, p_arr = np.asarray(sious), np.asarray(ppvs)
    f1s = []
    for t in SIOU_THRESHOLDS:
        tp, fn, fp = int((s_arr >= t).sum()), int((s_arr < t).sum()), int((p_arr < t).sum())
        f1s.append(2 * tp / (2 * tp + fn + fp) if (tp + fn + fp) else float("nan"))
    return ComponentMetrics(siou=float(s_arr.mean()) if s_arr.size else float("nan"),
                            ppv=float(p_arr.mean()) if p_arr.size else float("nan"),
                            mean_f1=float(np.nanmean(f1s)) if not np.isnan(f1s).all() else float("nan"),
                            threshold=float(threshold), num_gt=int(s_arr.size), num_pred=int(p_arr.size))
