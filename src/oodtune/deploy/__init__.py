"""A model shipped as an OOD detector: the calibrated :class:`Detector` (:mod:`.detector`: model + score +
threshold + weights hash, save/load, predictions on files), its threshold choice with a finite-sample guarantee
and the calibration scores behind conformal p-values (:mod:`.guarantee`), and its self-contained programs: a
``torch.export`` program (:mod:`.export`) and an ONNX graph (:mod:`.onnx_export`; needs the ``onnx`` extra only
when called); :mod:`.record`: the closed schema a saved detector file is validated against; for segmenters the
:class:`SegmentationDetector` (:mod:`.pixel_detector`: a pixel threshold, frames -> class map, anomaly map, mask)
and the files it writes per frame (:mod:`.map_files`)."""

from . import detector, export, guarantee, map_files, onnx_export, pixel_detector, record
from .detector import *  # noqa: F403
from .export import *  # noqa: F403
from .guarantee import *  # noqa: F403
from .map_files import *  # noqa: F403
from .onnx_export import *  # noqa: F403
from .pixel_detector import *  # noqa: F403
from .record import *  # noqa: F403

__all__ = [*detector.__all__, *export.__all__, *guarantee.__all__, *onnx_export.__all__, *pixel_detector.__all__,
           *map_files.__all__, *[n for n in record.__all__ if n not in detector.__all__]]
