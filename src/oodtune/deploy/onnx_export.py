"""A calibrated :class:`~oodtune.deploy.Detector` as one ONNX graph (opset 18): input normalisation, network,
score and decision, served by onnxruntime (or any ONNX runtime) without PyTorch or oodtune:

    import onnxruntime as ort
    session = ort.InferenceSession("detector.onnx")
    logits, score, is_ood = session.run(None, {"images": images})  # uint8 (N, H, W, 3) RGB, N dynamic

``is_ood = not (score >= threshold)``: the detector's ``score < threshold``, and a non-finite score (which the
Python detector refuses with an error) counts as OOD. The graph's metadata (``oodtune_detector``) holds the
detector record of :func:`oodtune.deploy.export.exported_record` as JSON: classes, resolution, score, threshold,
calibration and guarantee, with the calibration scores for conformal p-values. Images must already be resized to
the resolution (shorter side bilinear + centre crop, as :mod:`oodtune.data.images` does).

**Exportable scores**: every score computed from the logits and penultimate features with operations ONNX
has -- msp, maxlogit, entropy, energy, gen, klm, mahalanobis, knn (the ID-train feature bank becomes a constant
of the graph: N x D float32), vim, residual, react+..., dice+... . **Not exportable** (refused by
:func:`onnx_refusal` before any work): ``odin`` (input gradients: a backward pass per image, which an inference
graph does not carry) and the ``ash-*`` shapings (they rank activations with a stable sort; ONNX has only TopK,
whose order among tied activations -- frequent after ReLU -- is unspecified, and ASH-B's output depends on it).

The graph is traced by ``torch.onnx.export(dynamo=True)`` (needs the ``onnx`` extra: onnx, onnxscript;
onnxruntime to run and check it). ``torch.cdist``, which that exporter cannot translate, is written as ONNX
ops (the exact difference form, as the Python path computes it).

Segmenters: a calibrated :class:`~oodtune.deploy.pixel_detector.SegmentationDetector` exports its
:class:`~oodtune.deploy.pixel_detector.SegmentationProgram` the same way (:func:`export_onnx`): uint8 ``frames``
(N, H, W, 3) at the model's input height -> ``class_map``, ``anomaly``, ``mask``; batch dynamic, width dynamic
(any multiple of 8) when the exporter captures the network so, else fixed at the model's input width (the
record's ``input`` says which). :func:`write_onnx` exports any ``nn.Module`` that maps a batch of uint8 images to
named outputs, and :func:`run_onnx` runs such a file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.inputs import as_uint8_images
from ..errors import ConfigError, ModelError
from ..scores import Score, build_score
from ..utils.atomic import write_atomic
from .detector import Detector
from .export import DetectorProgram, exported_record
from .pixel_detector import PROGRAM_OUTPUTS, SegmentationDetector

__all__ = ["METADATA_KEY", "ONNX_OPSET", "OnnxCheck", "check_onnx", "export_onnx", "onnx_refusal", "read_onnx_record",
           "require_onnx", "run_onnx", "write_onnx"]

ONNX_OPSET = 18
METADATA_KEY = "oodtune_detector"
_INSTALL = "install the ONNX extra: pip install 'oodtune[onnx]' (onnx, onnxscript, onnxruntime)"


def onnx_refusal(score: Score) -> str | None:
    """Why ``score`` cannot be exported to ONNX (module docstring), or None when it can."""
    if score.needs_input_grad:
        return (f"score {score.name!r} needs input gradients (a backward pass per image), which an ONNX inference "
                "graph does not carry")
    ash = [part for part in score.name.split("+") if part.startswith("ash-")]
    if ash:
        return (f"score {score.name!r} uses {ash[0]}, which ranks activations with a stable sort; ONNX has only "
                "TopK, whose order among tied activations is unspecified")
    return None


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"ONNX export/serving needs the {module} package; {_INSTALL}.") from None


def require_onnx() -> None:
    """A :class:`ConfigError` naming the install command unless the ONNX extra (onnx, onnxscript, onnxruntime)
    is installed."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)


def _cdist(x1: Any, x2: Any, p: float = 2.0, compute_mode: int | None = None) -> Any:
    """``aten._cdist_forward`` (p = 2) as ONNX ops: sqrt(sum_d (x1[:, None] - x2[None])^2)."""
    from onnxscript import opset18 as op

    rows: Any = op.Constant(value_ints=[-2])  # Any: onnxscript types a Constant as any tensor type
    cols: Any = op.Constant(value_ints=[-3])
    last: Any = op.Constant(value_ints=[-1])
    diff = op.Sub(op.Unsqueeze(x1, rows), op.Unsqueeze(x2, cols))
    return op.Sqrt(op.ReduceSum(op.Mul(diff, diff), last, keepdims=0))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices about optional packages (torchvision ops) and its internal deprecation
    warnings while it runs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch's own exporter
            yield
    finally:
        logger.setLevel(level)


def write_onnx(program: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, output_names: Sequence[str],
               metadata: dict[str, str], input_name: str = "images", opset: int = ONNX_OPSET,
               overwrite: bool = False, dynamic_shapes: tuple[dict[int, Any], ...] | None = None) -> Path:
    """Export ``program`` (one tensor in, ``output_names`` out) to ``path`` as an ONNX model of ``opset`` with
    ``metadata`` (string key/values), checked by ``onnx.checker``; atomic. ``dynamic_shapes`` are
    ``torch.export``'s for the input (default: dimension 0, the batch, dynamic)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
    onnx = _require("onnx")
    _require("onnxscript")
    program = program.to("cpu").eval()
    try:
        with torch.no_grad(), _quiet_exporter():
            exported = torch.onnx.export(
                program, (example.cpu(),), dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes or ({0: torch.export.Dim("batch", min=1)},),
                custom_translation_table={torch.ops.aten._cdist_forward.default: _cdist}, verbose=False)
    except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
        raise ModelError(f"torch.onnx.export cannot convert this model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1][:300]}); serve the Python Detector instead.") from exc
    if exported is None:
        raise ModelError("torch.onnx.export returned no model; serve the Python Detector instead.")
    model = exported.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return write_atomic(path, lambda fh: fh.write(model.SerializeToString()), overwrite=True)


def export_onnx(det: Detector | SegmentationDetector, path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                overwrite: bool = False) -> Path:
    """Write the calibrated ``det`` as one ONNX graph to ``path``: for a :class:`Detector` uint8 (N, H, W, 3)
    ``images`` -> ``logits``, ``score``, ``is_ood`` (module docstring), for a :class:`SegmentationDetector`
    uint8 (N, H, W, 3) ``frames`` -> ``class_map``, ``anomaly``, ``mask`` (:func:`_export_segmenter`). Refused,
    before any work, without a calibration and for the scores :func:`onnx_refusal` names."""
    det.calibrated()
    score = det.score_fn if isinstance(det, Detector) else build_score(det.score_name)
    reason = onnx_refusal(score)
    if reason is not None:
        raise ConfigError(f"{reason}; export another score, or serve the Python detector.")
    if isinstance(det, SegmentationDetector):
        return _export_segmenter(det, path, opset=opset, overwrite=overwrite)
    program = DetectorProgram(det, det.score_fn.from_outputs, det.calibrated().threshold)
    example = torch.zeros(2, det.resolution, det.resolution, 3, dtype=torch.uint8)
    record = {**exported_record(det), "opset": opset}
    try:
        return write_onnx(program, example, path, output_names=("logits", "score", "is_ood"),
                          metadata={METADATA_KEY: json.dumps(record)}, opset=opset, overwrite=overwrite)
    finally:
        det.net.to(det.device)


def _export_segmenter(det: SegmentationDetector, path: str | os.PathLike, *, opset: int, overwrite: bool) -> Path:
    """The segmenter's :class:`~oodtune.deploy.pixel_detector.SegmentationProgram` as ONNX: uint8 (N, H, W, 3) RGB
    ``frames`` at the model's input height H (frames resized as :mod:`oodtune.data.frames` does) -> ``class_map``
    (N, H, W) int64, ``anomaly`` (N, H, W) float32 = threshold - score, ``mask`` (N, H, W) bool = anomaly > 0.
    The batch size is dynamic; the width W too (any multiple of 8) when the exporter captures the network so,
    else it is fixed at the model's input width -- the record's ``input`` says which. The metadata
    (:data:`METADATA_KEY`) holds :meth:`~oodtune.deploy.pixel_detector.SegmentationDetector.program_record` and
    the opset."""
    w, h = det.input_size
    example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    width_shapes, batch_shapes = det.frame_shapes()

    def write(dynamic: tuple[dict[int, Any], ...], dynamic_width: bool) -> Path:
        record = {**det.program_record(dynamic_width), "opset": opset}
        return write_onnx(det.program(), example, path, output_names=PROGRAM_OUTPUTS, input_name="frames",
                          metadata={METADATA_KEY: json.dumps(record)}, opset=opset, overwrite=overwrite,
                          dynamic_shapes=dynamic)

    try:
        try:
            return write(width_shapes, True)
        except ModelError:  # the network does not export with a free width: fix it at the trained one
            return write(batch_shapes, False)
    finally:
        det.net.to(det.device)


def _session(path: str | os.PathLike) -> Any:
    ort = _require("onnxruntime")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with `oodtune calibrate --export {path}`.")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise ConfigError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]}).") from exc


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs, by name, of the ONNX model at ``path`` (one input) on ``images`` (CPU onnxruntime)."""
    session = _session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: images})
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), outputs, strict=True)}


def read_onnx_record(path: str | os.PathLike) -> dict[str, Any]:
    """The detector record in the metadata of an ONNX file written by :func:`export_onnx`."""
    meta = _session(path).get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ConfigError(f"{path} is an ONNX model but not an oodtune detector (no {METADATA_KEY} metadata).")
    record: dict[str, Any] = json.loads(meta[METADATA_KEY])
    return record


@dataclass(frozen=True)
class OnnxCheck:
    """An ONNX detector against the Python one on the same images."""

    n: int  # images compared
    max_abs_score_diff: float  # max |score_onnx - score_python|
    class_mismatches: int  # images whose predicted class (argmax of the logits) differs
    near_threshold: int  # images with |score - threshold| <= margin (decisions may legitimately differ there)
    decision_mismatches: int  # differing is_ood among the others (must be 0)
    margin: float


def check_onnx(det: Detector, path: str | os.PathLike, images: Any, *, margin: float | None = None) -> OnnxCheck:
    """Compare the ONNX detector at ``path`` with ``det`` on ``images`` (any input :meth:`Detector.score`
    takes): score and logit differences, and decisions on the images farther than ``margin`` from the threshold
    (default 1e-4 (1 + |threshold|), far above float32 rounding of the score)."""
    threshold = det.calibrated().threshold
    margin = 1e-4 * (1 + abs(threshold)) if margin is None else float(margin)
    pixels = np.ascontiguousarray(as_uint8_images(images, det.resolution))
    ref = det.predict(pixels)
    out = run_onnx(path, pixels)
    far = np.abs(ref.scores - threshold) > margin
    return OnnxCheck(len(pixels), float(np.max(np.abs(out["score"] - ref.scores))),
                     int((out["logits"].argmax(axis=1) != ref.labels).sum()), int((~far).sum()),
                     int((out["is_ood"][far] != (ref.scores < threshold)[far]).sum()), margin)
