"""The OOD-aware losses and what sets their constants: loss terms and methods for classifiers (:mod:`.terms`),
per-pixel terms and methods for segmenters (:mod:`.pixel`), the outlier class prior of Balanced Energy
(:mod:`.prior`) and the energy-margin proposal (:mod:`.margins`)."""

from . import margins, pixel, prior, terms
from .margins import *  # noqa: F403
from .pixel import *  # noqa: F403
from .prior import *  # noqa: F403
from .terms import *  # noqa: F403

__all__ = [*terms.__all__, *pixel.__all__, *prior.__all__, *margins.__all__]
