"""A model shipped as an OOD detector: the calibrated :class:`Detector` (:mod:`.detector`: model + score +
threshold + weights hash, save/load, predictions on files) and its self-contained ``torch.export`` program
(:mod:`.export`); :mod:`.record`: the closed schema a saved detector file is validated against."""

from . import detector, export, record
from .detector import *  # noqa: F403
from .export import *  # noqa: F403
from .record import *  # noqa: F403

__all__ = [*detector.__all__, *export.__all__, *[n for n in record.__all__ if n not in detector.__all__]]
