"""Metrics: OOD detection (:mod:`.ood`), exact and in the field's conventions, and long-tailed accuracy
(:mod:`.longtail`)."""

from .longtail import (
                  LT_KEYS,
                  SPLITS,
                  adjust_logits,
                  class_splits,
                  long_tail_accuracy,
                  split_accuracy,
)
from .ood import (
                  DEFAULT_POSITIVE,
                  POSITIVES,
                  OODMetrics,
                  Positive,
                  accuracy,
                  aupr,
                  auroc,
                  fpr_at_tpr,
                  metrics_from_counts,
                  ood_metrics,
                  roc_curve,
)

__all__ = [
    "DEFAULT_POSITIVE", "LT_KEYS", "POSITIVES", "SPLITS", "OODMetrics", "Positive", "accuracy", "adjust_logits",
    "aupr", "auroc", "class_splits", "fpr_at_tpr", "long_tail_accuracy", "metrics_from_counts", "ood_metrics",
    "roc_curve", "split_accuracy",
]
