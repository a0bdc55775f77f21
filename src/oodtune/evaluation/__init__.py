"""Forward passes, scoring and detection metrics of a trained network on data sets: a classifier on image sets
(:mod:`.classification`) and a segmenter on frames, pixel by pixel (:mod:`.segmentation`)."""

from . import classification, segmentation
from .classification import *  # noqa: F403
from .segmentation import *  # noqa: F403

__all__ = [*classification.__all__, *segmentation.__all__]
