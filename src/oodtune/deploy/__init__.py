"""A model shipped as an OOD detector: the calibrated :class:`Detector` (:mod:`.detector`: model + score +
threshold + weights hash, save/load, predictions on files), its threshold choice with a finite-sample guarantee
and the calibration scores behind conformal p-values (:mod:`.guarantee`), and its self-contained programs: a
``torch.export`` program (:mod:`.export`) and an ONNX graph (:mod:`.onnx_export`; needs the ``onnx`` extra only
when called)."""

from . import detector, export, guarantee, onnx_export
from .detector import *  # noqa: F403
from .export import *  # noqa: F403
from .guarantee import *  # noqa: F403
from .onnx_export import *  # noqa: F403

__all__ = [*detector.__all__, *export.__all__, *guarantee.__all__, *onnx_export.__all__]
