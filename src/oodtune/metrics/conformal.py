"""Thresholds with a finite-sample guarantee, conformal p-values and Benjamini–Hochberg, on arrays of scores.

Task-agnostic: the inputs are scores of exchangeable units (images, frames) with the oodtune convention
**higher = more in-distribution**; a unit is accepted as ID when ``score >= t``.

**Order-statistic threshold.** Let S_1..S_n be the calibration scores of n ID units and t the k-th largest of
them. For a new ID unit from the same (continuous) distribution F, the acceptance rate given the calibration set is
A = 1 - F(t), and over the draw of the calibration set A ~ Beta(k, n + 1 - k) (F(t) is the (n + 1 - k)-th smallest
of n uniforms). Hence

    P(A >= p) = P(U_(n+1-k) <= 1 - p) = P(Binomial(n, 1 - p) >= n + 1 - k)            (:func:`coverage`)

and the *guaranteed* threshold is the k-th largest score for the smallest k with P(A >= p) >= confidence
(:func:`guaranteed_rank`; the "training-conditional" or PAC guarantee of inductive conformal prediction, Vovk 2012,
"Conditional validity of inductive conformal predictors"). With ties (discrete scores) acceptance by
``score >= t`` only grows, so the guarantee still holds. It exists only when even the smallest score suffices,
1 - p^n >= confidence, i.e. n >= log(1 - confidence) / log(p) (:func:`min_size_for_guarantee`: 90 for p = 0.95
at 99 %). The point estimate k = ceil(p n) (:func:`oodtune.metrics.threshold_at_tpr`) meets p only on average.

**Conformal p-values** (Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with conformal p-values",
Ann. Statist. 51(1), 2023, eq. (3), the *marginal* p-value): for a test score s,

    p(s) = (1 + #{i : S_i <= s}) / (n + 1)

(calibration scores at least as extreme, i.e. at least as OOD-like). For an ID test unit exchangeable with the
calibration set, P(p <= a) <= a for every a (exactly floor(a (n + 1)) / (n + 1) without ties).

**Benjamini–Hochberg** (1995) on m such p-values at level q: sort p_(1) <= ... <= p_(m), find the largest j with
p_(j) <= j q / m, flag the j units with the smallest p-values. Marginal conformal p-values sharing one calibration
set are PRDS (Bates et al., Theorem 2), so the false discovery rate is <= q m_0 / m <= q.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from ..errors import ConfigError, DataError

__all__ = ["acceptance_lower_bound", "benjamini_hochberg", "conformal_p_values", "coverage", "guaranteed_rank",
           "kth_largest", "min_size_for_guarantee", "point_rank"]


def _check_rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ConfigError(f"{name} must be strictly between 0 and 1, got {value}.")
    return value


def _check_rank(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ConfigError(f"rank k must be in [1, {n}] for {n} calibration scores, got {k}.")


def point_rank(n: int, tpr: float) -> int:
    """k = ceil(tpr * n) (at least 1): the rank from the top of the point-estimate threshold."""
    return max(1, math.ceil(_check_rate("tpr", tpr) * n - 1e-9))  # the tolerance keeps 0.95 * 100 at 95


@lru_cache(maxsize=256)  # pure; calibration sweeps ask for the same (n, tpr, confidence)
def coverage(k: int, n: int, tpr: float) -> float:
    """P(A >= tpr) for the k-th largest of n calibration scores as the threshold, A ~ Beta(k, n + 1 - k) the
    acceptance rate of new ID units: P(Binomial(n, 1 - tpr) >= n + 1 - k). Exact for continuous scores."""
    _check_rank(k, n)
    return float(stats.binom.sf(n - k, n, 1.0 - _check_rate("tpr", tpr)))


@lru_cache(maxsize=256)  # pure; calibration sweeps ask for the same (n, tpr, confidence)
def acceptance_lower_bound(k: int, n: int, confidence: float) -> float:
    """The ``confidence`` lower bound on the acceptance rate of the k-th largest of n scores as the threshold:
    the (1 - confidence) quantile of Beta(k, n + 1 - k)."""
    _check_rank(k, n)
    return float(stats.beta.ppf(1.0 - _check_rate("confidence", confidence), k, n + 1 - k))


def min_size_for_guarantee(tpr: float, confidence: float) -> int:
    """The smallest n for which some order statistic guarantees acceptance >= ``tpr`` with probability >=
    ``confidence``: the smallest n with 1 - tpr^n >= confidence (then the threshold is the smallest score)."""
    p, c = _check_rate("tpr", tpr), _check_rate("confidence", confidence)
    n = max(1, math.ceil(math.log1p(-c) / math.log(p)) - 1)
    while 1.0 - p ** n < c:  # the closed form, corrected for rounding
        n += 1
    return n


@lru_cache(maxsize=256)  # pure; calibration sweeps ask for the same (n, tpr, confidence)
def guaranteed_rank(n: int, tpr: float, confidence: float) -> int | None:
    """The smallest k such that the k-th largest of n calibration scores accepts >= ``tpr`` of new ID units with
    probability >= ``confidence`` (module docstring); None when n is too small for any k."""
    p, c = _check_rate("tpr", tpr), _check_rate("confidence", confidence)
    if n < 1:
        return None
    # the number of scores left below the threshold, j - 1 = n - k: the largest m with P(Bin(n, 1 - p) <= m) <= 1 - c
    m = int(stats.binom.ppf(1.0 - c, n, 1.0 - p))  # smallest m with cdf(m) >= 1 - c
    while m >= 0 and stats.binom.cdf(m, n, 1.0 - p) > 1.0 - c:
        m -= 1
    while m + 1 < n and stats.binom.cdf(m + 1, n, 1.0 - p) <= 1.0 - c:
        m += 1
    return None if m < 0 else n - m


def kth_largest(scores: np.ndarray, k: int) -> float:
    """The k-th largest of ``scores`` (1-D)."""
    s = np.asarray(scores)
    _check_rank(k, s.size)
    return float(np.partition(s, s.size - k)[s.size - k])


def _finite_1d(name: str, values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise DataError(f"{name} must be a 1-D array, got shape {a.shape}.")
    return a


def conformal_p_values(calibration: Any, scores: Any) -> np.ndarray:
    """Marginal conformal p-values (1 + #{calibration <= s}) / (n + 1) of ``scores`` (module docstring); NaN
    where a score is NaN. Small p-values are evidence against "in-distribution"."""
    cal = _finite_1d("calibration scores", calibration)
    if cal.size == 0 or not np.isfinite(cal).all():
        raise DataError("conformal p-values need a non-empty set of finite calibration scores.")
    s = _finite_1d("scores", scores)
    counts = np.searchsorted(np.sort(cal), s, side="right")
    p = (1.0 + counts) / (cal.size + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def benjamini_hochberg(p_values: Any, fdr: float) -> np.ndarray:
    """Which units the Benjamini–Hochberg procedure at level ``fdr`` flags (bool array); NaN p-values (units
    without a score) are neither counted nor flagged."""
    q = _check_rate("fdr", fdr)
    p = _finite_1d("p-values", p_values)
    valid = ~np.isnan(p)
    flagged = np.zeros(p.shape, dtype=bool)
    m = int(valid.sum())
    if m == 0:
        return flagged
    ordered = np.sort(p[valid])
    below = np.nonzero(ordered <= q * np.arange(1, m + 1) / m)[0]
    if below.size:
        flagged[valid] = p[valid] <= ordered[below[-1]]
    return flagged
