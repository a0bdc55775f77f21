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
                  DETECTION_KEYS,
                  FPR_RULES,
                  POSITIVES,
                  OODMetrics,
                  Positive,
                  acceptance_rate,
                  accuracy,
                  aupr,
                  auroc,
                  detection_metrics,
                  fpr_at_tpr,
                  metric_convention,
                  metrics_from_counts,
                  min_calibration_size,
                  ood_metrics,
                  roc_curve,
                  threshold_at_tpr,
)

__all__ = [
    "DEFAULT_POSITIVE", "DETECTION_KEYS", "FPR_RULES", "LT_KEYS", "POSITIVES", "SPLITS", "OODMetrics", "Positive",
    "acceptance_rate", "accuracy", "adjust_logits", "aupr", "auroc", "class_splits", "detection_metrics", "fpr_at_tpr",
    "long_tail_accuracy", "metric_convention", "metrics_from_counts", "min_calibration_size", "ood_metrics",
    "roc_curve", "split_accuracy", "threshold_at_tpr",
]
