"""A detector's threshold choice with its finite-sample guarantee, and the calibration scores behind it.

:class:`Guarantee` is task-agnostic: it is built from the calibration scores of exchangeable units (images for a
classifier; frames, not pixels, for a segmenter, since pixels of one frame are not exchangeable) and holds

* the point-estimate threshold (the k-th largest score, k = ceil(tpr n)): acceptance ``tpr`` on average;
* with ``confidence``, the order-statistic threshold that accepts >= ``tpr`` of new ID units with probability
  >= ``confidence`` over the draw of the calibration set (:mod:`oodtune.metrics.conformal`), and which is then
  the threshold in use;
* the calibration scores themselves, sorted, for conformal p-values (Bates et al. 2023) at prediction time.

In a detector file it is the one ``"guarantee"`` object (:meth:`Guarantee.to_dict`); the scores are stored
compactly as base64 of little-endian float32 with their SHA-256. :meth:`Guarantee.from_dict` recomputes every
derived field from the scores, ``tpr`` and ``confidence`` and refuses a record that disagrees (a damaged or
hand-edited file), naming the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..metrics import min_calibration_size
from ..metrics.conformal import (
    acceptance_lower_bound,
    benjamini_hochberg,
    conformal_p_values,
    coverage,
    guaranteed_rank,
    kth_largest,
    min_size_for_guarantee,
    point_rank,
)

__all__ = ["SCORES_ENCODING", "Guarantee"]

SCORES_ENCODING = "base64 of float32 little-endian, sorted ascending"
_KEYS = ("tpr", "confidence", "point_rank", "point_threshold", "bound_rank", "bound_threshold", "coverage",
         "acceptance_lower_bound", "calibration_scores")
_SCORE_KEYS = ("encoding", "n", "sha256", "data")


def _encode(scores: np.ndarray) -> dict[str, Any]:
    raw = scores.astype("<f4").tobytes()
    return {"encoding": SCORES_ENCODING, "n": int(scores.size), "sha256": hashlib.sha256(raw).hexdigest(),
            "data": base64.b64encode(raw).decode("ascii")}


def _decode(record: Any, where: str) -> np.ndarray:
    if not isinstance(record, dict) or set(record) != set(_SCORE_KEYS):
        raise ConfigError(f"{where}.calibration_scores must be an object with exactly the fields "
                          f"{', '.join(_SCORE_KEYS)}; calibrate again.")
    if record["encoding"] != SCORES_ENCODING:
        raise ConfigError(f"{where}.calibration_scores.encoding is {record['encoding']!r}, expected "
                          f"{SCORES_ENCODING!r}; calibrate again.")
    n = record["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}.calibration_scores.n must be a positive integer, got {n!r}; calibrate again.")
    try:
        raw = base64.b64decode(str(record["data"]).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ConfigError(f"{where}.calibration_scores.data is not valid base64; calibrate again.") from None
    if len(raw) != 4 * n:
        raise ConfigError(f"{where}.calibration_scores.data holds {len(raw)} bytes, expected {4 * n} for n = {n} "
                          "float32 scores; calibrate again.")
    if hashlib.sha256(raw).hexdigest() != record["sha256"]:
        raise ConfigError(f"{where}.calibration_scores.data does not match its sha256 (a damaged file); calibrate "
                          "again.")
    scores = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(scores).all() or np.any(np.diff(scores) < 0):
        raise ConfigError(f"{where}.calibration_scores must be finite and sorted ascending; calibrate again.")
    return scores


@dataclass(frozen=True, eq=False)
class Guarantee:
    """How the threshold follows from the calibration scores (module docstring); build with :meth:`from_scores`."""

    tpr: float  # requested acceptance rate of ID units
    confidence: float | None  # probability of the guarantee over the calibration draw; None: point estimate
    point_rank: int  # k = ceil(tpr n): the point estimate is the k-th largest score
    point_threshold: float
    bound_rank: int | None  # the smallest k meeting the guarantee (None without ``confidence``)
    bound_threshold: float | None
    coverage: float  # P(acceptance >= tpr) of the threshold in use (exact for continuous scores)
    acceptance_lower_bound: float | None  # the acceptance rate reached with probability ``confidence``
    scores: np.ndarray = field(repr=False)  # (n,) float32 calibration scores, sorted ascending

    @classmethod
    def from_scores(cls, scores: Any, tpr: float, confidence: float | None = None) -> Guarantee:
        """The thresholds for calibration ``scores`` (higher = more ID). Refuses (:class:`DataError`, saying how
        many are needed) a set too small: for a guarantee, fewer than
        :func:`~oodtune.metrics.conformal.min_size_for_guarantee`; for a point estimate, fewer than
        :func:`~oodtune.metrics.min_calibration_size` (10 units below the threshold)."""
        s = np.sort(np.asarray(scores, dtype=np.float32).ravel())
        if not np.isfinite(s).all():
            raise DataError("calibration scores contain NaN/inf; the model produced non-finite outputs.")
        n = int(s.size)
        k_point = point_rank(max(n, 1), tpr)
        if confidence is None:
            need = min_calibration_size(tpr)
            if n < need:
                raise DataError(f"{n} calibration images are too few for a threshold at TPR {tpr:g}: at least {need} "
                                "are needed (so that >= 10 fall below it); use more held-out ID images or a lower "
                                "TPR.")
            return cls(tpr, None, k_point, kth_largest(s, k_point), None, None, coverage(k_point, n, tpr), None, s)
        k_bound = guaranteed_rank(n, tpr, confidence)
        if k_bound is None:
            need = min_size_for_guarantee(tpr, confidence)
            raise DataError(f"{n} calibration images are too few to guarantee acceptance >= {tpr:g} with confidence "
                            f"{confidence:g}: at least {need} are needed (1 - tpr^n >= confidence); use more held-out "
                            "ID images, a lower --confidence or a lower --tpr.")
        return cls(tpr, float(confidence), k_point, kth_largest(s, k_point), k_bound, kth_largest(s, k_bound),
                   coverage(k_bound, n, tpr), acceptance_lower_bound(k_bound, n, confidence), s)

    @property
    def n(self) -> int:
        return int(self.scores.size)

    @property
    def rank(self) -> int:
        """k of the threshold in use (the bound's when there is a confidence)."""
        return self.point_rank if self.bound_rank is None else self.bound_rank

    @property
    def threshold(self) -> float:
        """The threshold in use: the guaranteed one when there is a confidence, else the point estimate."""
        return self.point_threshold if self.bound_threshold is None else self.bound_threshold

    def p_values(self, scores: Any) -> np.ndarray:
        """Conformal p-values of ``scores`` against the calibration scores (NaN for NaN scores)."""
        return conformal_p_values(self.scores, scores)

    def flag_fdr(self, scores: Any, fdr: float) -> np.ndarray:
        """Which of a batch of ``scores`` Benjamini–Hochberg at level ``fdr`` flags as OOD."""
        return benjamini_hochberg(self.p_values(scores), fdr)

    def summary(self) -> str:
        """One line per threshold, for people."""
        point = (f"point estimate: threshold {self.point_threshold:.6g} (rank {self.point_rank} from the top of "
                 f"{self.n}) accepts {self.tpr:.2%} of new ID images on average")
        if self.bound_rank is None:
            return point + f", at least {self.tpr:.2%} only with probability {self.coverage:.1%}"
        return (f"guaranteed: threshold {self.bound_threshold:.6g} (rank {self.bound_rank} from the top of {self.n}) "
                f"accepts >= {self.tpr:.2%} of new ID images with probability {self.coverage:.2%} (requested "
                f"{self.confidence:g}); with probability {self.confidence:g} it accepts >= "
                f"{self.acceptance_lower_bound:.2%}\n{point}")

    # -- the detector-file record ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"tpr": self.tpr, "confidence": self.confidence, "point_rank": self.point_rank,
                "point_threshold": self.point_threshold, "bound_rank": self.bound_rank,
                "bound_threshold": self.bound_threshold, "coverage": self.coverage,
                "acceptance_lower_bound": self.acceptance_lower_bound,
                "calibration_scores": _encode(self.scores)}

    @classmethod
    def from_dict(cls, record: Any, where: str = "guarantee") -> Guarantee:
        """The guarantee of a :meth:`to_dict` record, validated: exactly its fields, readable scores, and every
        derived field equal to its recomputation (``where`` names the record in errors)."""
        if not isinstance(record, dict) or set(record) != set(_KEYS):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{where} must be an object with exactly the fields {', '.join(_KEYS)} (got {got}); "
                              "calibrate again.")
        scores = _decode(record["calibration_scores"], where)
        for key in ("tpr", "confidence"):
            value = record[key]
            if not (value is None and key == "confidence") and (
                    not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1):
                raise ConfigError(f"{where}.{key} must be a number strictly between 0 and 1, got {value!r}; "
                                  "calibrate again.")
        try:
            fresh = cls.from_scores(scores, record["tpr"], record["confidence"])
        except DataError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for key, expected in fresh.to_dict().items():
            value = record[key]
            if key == "calibration_scores":
                continue
            same = value == expected if not isinstance(expected, float) or not isinstance(value, (int, float)) \
                else math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)
            if not same or isinstance(value, bool):
                raise ConfigError(f"{where}.{key} is {value!r} but the stored calibration scores give {expected!r} "
                                  "(a damaged or edited file); calibrate again.")
        return fresh
