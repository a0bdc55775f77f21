"""The OOD-aware losses and what sets their constants: loss terms and methods for classifiers (:mod:`.terms`),
per-pixel terms and methods for segmenters (:mod:`.pixel`), the outlier class prior of Balanced Energy
(:mod:`.prior`) and the energy-margin proposal (:mod:`.margins`); every loss option, defined once (:mod:`.options`),
and each task's methods and defaults (:mod:`.registry`)."""

from . import margins, options, pixel, prior, registry, terms
from .margins import *  # noqa: F403
from .options import *  # noqa: F403
from .pixel import *  # noqa: F403
from .prior import *  # noqa: F403
from .registry import *  # noqa: F403
from .terms import *  # noqa: F403

__all__ = [*terms.__all__, *pixel.__all__, *prior.__all__, *margins.__all__, *options.__all__, *registry.__all__]
