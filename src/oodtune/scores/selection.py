"""Leak-free hyperparameter selection for post-hoc scores.

A score's hyperparameters (ReAct's clipping percentile, ASH's pruning percentile, DICE's sparsity, kNN's k, the
ViM/Residual subspace dimension, temperatures, ODIN's eps, GEN's gamma) are chosen on a **validation pair** that
shares nothing with the test sets:

* never-trained-on ID images: the validation part held out of the ID train split *before pretraining* (or, for
  a model trained on a subsample, images of the train split outside it), so the ID side of the pair looks like
  test data to the network, not like memorised training data;
* held-out auxiliary outliers: images of the auxiliary-outlier distribution that fine-tuning never sees (for
  the offline CIFAR-10 protocol ``tin-aux-val``, the Tiny ImageNet *val* images of the auxiliary classes),
  never an OOD test set.

**Rule** (:data:`RULE`): every setting of the score's grid is fitted and scored; the one with the highest AUROC of
held-out ID vs held-out outliers is the candidate (exact ties: the paper default, always tried first, then grid order).
The **paper default is kept unless the candidate's validation gain exceeds its standard error**: the SE of
AUROC(candidate) - AUROC(default) from a paired bootstrap over the validation images (:data:`SE_REPLICATES` replicates,
ID and outlier images resampled within each set, the same draw for both settings). A candidate that cannot be fitted
(e.g. kNN's k larger than the fit set) is recorded with its error and skipped. The alternative is to keep the paper
defaults (no selection).

OpenOOD (v1.5) selects the same way (max AUROC over a grid), but its OOD validation set is drawn from one of its
own test distributions (held-out CIFAR-100 images for CIFAR-10, whose near-OOD test sets include CIFAR-100;
OpenImage-O for ImageNet, also a far-OOD test set), so the chosen hyperparameters have seen the test
distribution. Here the validation outliers come from the auxiliary (training-outlier) distribution only.

This module is pure: the caller (:func:`oodtune.evaluation.evaluate`) supplies ``validate(candidate) ->
(held-out ID scores, held-out outlier scores)``, which fits the candidate on ID train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ScoreError
from ..metrics import auroc
from ..metrics.bootstrap import weighted_detection_metrics
from .base import Score

__all__ = ["RULE", "SE_REPLICATES", "Selection", "gain_standard_error", "select_hyperparameters"]

RULE = ("highest AUROC of never-trained-on ID images vs held-out auxiliary outliers (ties: paper default, then grid "
        "order); the paper default is kept unless that gain exceeds its paired-bootstrap standard error")
#: Paired bootstrap replicates behind the standard error of a validation gain.
SE_REPLICATES = 200

Validate = Callable[[Score], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Selection:
    """What the selection of one score tried and chose (JSON-ready through :meth:`to_dict`)."""

    score: str
    default: dict[str, Any]
    chosen: dict[str, Any]
    tried: list[dict[str, Any]] = field(default_factory=list)  # params + "auroc" (percent) or "error"
    rule: str = RULE
    gain: float | None = None  # validation AUROC of the best setting minus the default's (points)
    gain_se: float | None = None  # its paired-bootstrap standard error (points)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "default": self.default, "chosen": self.chosen, "tried": self.tried,
                "rule": self.rule, "gain": self.gain, "gain_se": self.gain_se}


def gain_standard_error(best: tuple[np.ndarray, np.ndarray], default: tuple[np.ndarray, np.ndarray], *,
                        replicates: int = SE_REPLICATES, seed: int = 0, metric: str = "auroc") -> float:
    """Standard error (points) of ``metric``(best) - ``metric``(default) (AUROC by default) on the same validation
    images: a paired bootstrap, ID and outlier images resampled within each set, the same draw for both settings."""
    rng = np.random.default_rng(seed)
    n_id, n_out = len(best[0]), len(best[1])
    w_id = rng.multinomial(n_id, np.full(n_id, 1.0 / n_id), size=replicates)
    w_out = rng.multinomial(n_out, np.full(n_out, 1.0 / n_out), size=replicates)
    diff = (weighted_detection_metrics(*best, w_id, w_out)[metric]
            - weighted_detection_metrics(*default, w_id, w_out)[metric])
    return float(diff.std(ddof=1))


def select_hyperparameters(score: Score, feature_dim: int, validate: Validate) -> tuple[Score, Selection]:
    """The best setting of ``score``'s grid by :data:`RULE` (a fresh, unfitted score) and the record of the search.

    ``validate(candidate)`` fits a candidate on ID train minus the held-out images and returns its scores on the
    held-out ID images and on the held-out outliers. A score with no hyperparameters is returned unchanged.
    """
    settings = score.candidates(feature_dim)
    default = settings[0]
    if not score.hyperparameter_grid(feature_dim):
        return score, Selection(score.name, default, default)
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], tuple[np.ndarray, np.ndarray]] | None = None
    kept: tuple[float, tuple[np.ndarray, np.ndarray]] | None = None  # the default's AUROC and scores
    for setting in settings:
        candidate = score.with_params(**setting)
        try:
            s_id, s_out = validate(candidate)
        except ScoreError as exc:
            tried.append({**setting, "error": str(exc)})
            continue
        value = 100 * auroc(s_id, s_out)
        tried.append({**setting, "auroc": value})
        if setting == default:
            kept = (value, (np.asarray(s_id), np.asarray(s_out)))
        if best is None or value > best[0]:
            best = (value, setting, (np.asarray(s_id), np.asarray(s_out)))
    if best is None:
        raise ScoreError(f"no hyperparameter setting of {score.name} could be fitted on the validation pair: "
                         + "; ".join(str(t["error"]) for t in tried))
    if kept is None or best[1] == default:  # the default could not be fitted, or it won outright
        return score.with_params(**best[1]), Selection(score.name, default, best[1], tried)
    gain, se = best[0] - kept[0], gain_standard_error(best[2], kept[1])
    chosen = best[1] if gain > se else default
    return score.with_params(**chosen), Selection(score.name, default, chosen, tried, gain=gain, gain_se=se)
