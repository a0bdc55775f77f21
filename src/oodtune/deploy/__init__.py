"""A model shipped as an OOD detector: the calibrated :class:`Detector` (:mod:`.detector`: model + score +
threshold + weights hash, save/load, predictions on files) and its self-contained ``torch.export`` program
(:mod:`.export`)."""

from . import detector, export
from .detector import *  # noqa: F403
from .export import *  # noqa: F403

__all__ = [*detector.__all__, *export.__all__]
