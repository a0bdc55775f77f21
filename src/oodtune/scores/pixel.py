"""Per-pixel scores of segmentation logits: a logit score's formula applied to every pixel's class logits."""

from __future__ import annotations

import torch

from ..errors import ConfigError, ScoreError
from .base import LogitScore, Score

__all__ = ["PIXEL_SCORE_NAMES", "score_map"]

#: Scores that read only the logits (and need no ID statistics), and so apply to every pixel of a segmentation map.
PIXEL_SCORE_NAMES: tuple[str, ...] = ("msp", "maxlogit", "entropy", "energy")


def score_map(score: Score, logits: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Per-pixel scores (B, H, W), higher = more in-distribution, of segmentation logits (B, C, H, W): the score's
    formula applied to each pixel's class logits ``logits[:, :num_classes]`` (channels after them, such as a void
    or abstention output, are left out; default: all channels)."""
    if not isinstance(score, LogitScore) or score.needs_fit:
        raise ConfigError(f"score {score.name!r} is not a pixel score; segmentation supports "
                          f"{', '.join(PIXEL_SCORE_NAMES)}.")
    if logits.ndim != 4:
        raise ScoreError(f"segmentation logits must have shape (batch, channels, height, width), got "
                         f"{tuple(logits.shape)}.")
    b, _, h, w = logits.shape
    k = logits.shape[1] if num_classes is None else num_classes
    flat = logits[:, :k].permute(0, 2, 3, 1).reshape(-1, k)
    return score.from_outputs(flat, flat).reshape(b, h, w)
