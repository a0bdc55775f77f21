"""Leak-free hyperparameter selection for post-hoc scores.

A score's hyperparameters (ReAct's clipping percentile, ASH's pruning percentile, DICE's sparsity, kNN's k, the
ViM/Residual subspace dimension, temperatures, ODIN's eps, GEN's gamma) are chosen on a **validation pair** that
shares nothing with the test sets:

* held-out ID images: a seeded part of the ID *train* split, removed from the statistics fit while selecting;
* held-out auxiliary outliers: images of the auxiliary-outlier distribution that fine-tuning never sees (for
  the offline CIFAR-10 protocol ``tin-aux-val``, the Tiny ImageNet *val* images of the auxiliary classes),
  never an OOD test set.

**Rule** (:data:`RULE`): every setting of the score's grid is fitted and scored; the one with the highest AUROC
of held-out ID vs held-out outliers wins; exact ties go to the paper default (always tried first), then to grid
order. A candidate that cannot be fitted (e.g. kNN's k larger than the fit set) is recorded with its error and
skipped. The alternative is to keep the paper defaults (no selection).

OpenOOD (v1.5) selects the same way (max AUROC over a grid), but its OOD validation set is drawn from one of its
own test distributions (held-out CIFAR-100 images for CIFAR-10, whose near-OOD test sets include CIFAR-100;
OpenImage-O for ImageNet, also a far-OOD test set), so the chosen hyperparameters have seen the test
distribution. Here the validation outliers come from the auxiliary (training-outlier) distribution only.

This module is pure: the caller (:func:`oodtune.evaluation.evaluate`) supplies ``validate(candidate) ->
(held-out ID scores, held-out outlier scores)``, which fits the candidate on ID train minus the held-out images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ScoreError
from ..metrics import auroc
from .base import Score

__all__ = ["RULE", "Selection", "select_hyperparameters"]

RULE = ("highest AUROC of held-out ID train images vs held-out auxiliary outliers; ties go to the paper default, "
        "then to grid order")

Validate = Callable[[Score], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Selection:
    """What the selection of one score tried and chose (JSON-ready through :meth:`to_dict`)."""

    score: str
    default: dict[str, Any]
    chosen: dict[str, Any]
    tried: list[dict[str, Any]] = field(default_factory=list)  # params + "auroc" (percent) or "error"
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "default": self.default, "chosen": self.chosen, "tried": self.tried,
                "rule": self.rule}


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
    best: tuple[float, dict[str, Any]] | None = None
    for setting in settings:
        candidate = score.with_params(**setting)
        try:
            s_id, s_out = validate(candidate)
        except ScoreError as exc:
            tried.append({**setting, "error": str(exc)})
            continue
        value = 100 * auroc(s_id, s_out)
        tried.append({**setting, "auroc": value})
        if best is None or value > best[0]:
            best = (value, setting)
    if best is None:
        raise ScoreError(f"no hyperparameter setting of {score.name} could be fitted on the validation pair: "
                         + "; ".join(str(t["error"]) for t in tried))
    return score.with_params(**best[1]), Selection(score.name, default, best[1], tried)
