"""A calibrated :class:`~oodtune.deploy.Detector` as one self-contained file that a service loads with PyTorch
alone -- no oodtune, no training code -- through ``torch.export``:

    program = torch.export.load("detector.pt2").module()
    logits, score, is_ood = program(images)   # images: uint8 (N, H, W, 3) RGB at the detector's resolution

Inside: the input normalisation (x / 255 - mean) / std, the network, the score and the threshold
(``is_ood = not (score >= threshold)``: ``score < threshold``, with a non-finite score counted as OOD). The
batch size is dynamic. The file also carries the detector's JSON record (classes, resolution, score,
threshold, calibration, guarantee, weights hash) as the extra file
``oodtune_detector.json``; :func:`load_exported` returns both. Images must already be resized to the
resolution (shorter side bilinear + centre crop is what oodtune does, :mod:`oodtune.data.images`).

Exported scores are those computed from the logits alone (msp, maxlogit, entropy, energy); Mahalanobis and kNN
(fitted feature statistics) and ODIN (input gradients) stay with the Python detector.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..scores import Score, build_score
from ..utils.atomic import write_atomic
from .detector import RULE, Detector

__all__ = ["EXTRA_FILE", "DetectorProgram", "check_exportable", "export_detector", "exported_record", "load_exported"]

EXTRA_FILE = "oodtune_detector.json"


class DetectorProgram(nn.Module):
    """uint8 (N, H, W, 3) -> (logits, score, is_ood); see the module docstring. ``score`` maps (logits,
    features) to scores; ``is_ood`` is ``not (score >= threshold)``: ``score < threshold``, and a non-finite score
    (which the Python detector refuses) counts as OOD. Shared by the torch.export and the ONNX exporters."""

    mean: torch.Tensor
    std: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, det: Detector, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 threshold: float) -> None:
        super().__init__()
        self.net = det.net
        self.score = score
        self.register_buffer("mean", torch.tensor(det.normalizer.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(det.normalizer.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        logits, features = self.net(x)
        logits = logits.float()
        score = self.score(logits, features.float())
        return logits, score, ~(score >= self.threshold)


def exported_record(det: Detector) -> dict[str, Any]:
    """The detector record an exported file carries: rule, score, threshold, classes, resolution, input and
    outputs, weights hash, checkpoint, calibration and (when there is one) the guarantee with the calibration
    scores, from which a service computes conformal p-values (:mod:`oodtune.deploy.guarantee`)."""
    calibration = det.calibrated()
    record = {"rule": RULE, "score": det.score_name, "threshold": calibration.threshold,
              "classes": list(det.classes), "resolution": det.resolution, "input": "uint8 (N, H, W, 3) RGB",
              "outputs": ["logits", "score", "is_ood"], "weights_sha256": det.weights_sha256,
              "checkpoint": det.checkpoint, "calibration": calibration.to_dict()}
    if det.guarantee is not None:
        record["guarantee"] = det.guarantee.to_dict()
    return record


def check_exportable(score: str | Score) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits -> score function of ``score``; a :class:`ConfigError` for a score that cannot be exported
    (called by ``oodtune calibrate --export`` before any work)."""
    fn = build_score(score) if isinstance(score, str) else score
    from_logits = getattr(fn, "from_logits", None)
    if from_logits is None:
        raise ConfigError(f"score {fn.name!r} cannot be exported (it needs features or input gradients); "
                          "export a logit score (msp, maxlogit, entropy, energy, gen, klm), or serve the Python "
                          "Detector.")
    return from_logits


def export_detector(det: Detector, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``det`` (calibrated, with a logit score) as a ``torch.export`` program to ``path`` (``.pt2``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
    calibration = det.calibrated()
    from_logits = check_exportable(det.score_fn)
    program = DetectorProgram(det, lambda logits, _: from_logits(logits), calibration.threshold).to("cpu").eval()
    example = torch.zeros(2, det.resolution, det.resolution, 3, dtype=torch.uint8)
    try:
        with torch.no_grad():
            exported = torch.export.export(program, (example,),
                                           dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:  # torch.export raises many types; all mean "this model does not export"
        raise ModelError(f"torch.export cannot capture this model ({type(exc).__name__}: {str(exc)[:300]}); "
                         "serve the Python Detector instead.") from exc
    finally:
        det.net.to(det.device)
    extra = {EXTRA_FILE: json.dumps(exported_record(det), indent=2)}
    return write_atomic(path, lambda fh: torch.export.save(exported, fh, extra_files=extra))


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(the callable program, its detector record) of a file written by :func:`export_detector` or
    :meth:`oodtune.deploy.pixel_detector.SegmentationDetector.export`; a folder, a truncated or foreign file is a
    :class:`ConfigError` naming it."""
    path = Path(path)
    expected = "expected a .pt2 file written by `oodtune calibrate --export` (export_detector)"
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not an exported detector; {expected}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {expected}.")
    extra = {EXTRA_FILE: ""}
    torch_log = logging.getLogger("torch.export")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)  # torch logs its own traceback before raising
    try:
        program = torch.export.load(str(path), extra_files=extra).module()
    except Exception as exc:  # zipfile, torch and pickle errors: all mean "not a readable exported program"
        raise ConfigError(f"{path} is not an exported oodtune detector ({type(exc).__name__}: {str(exc)[:200]}); "
                          f"{expected}.") from exc
    finally:
        torch_log.setLevel(level)
    if not extra[EXTRA_FILE]:
        raise ConfigError(f"{path} is an exported program but not an exported oodtune detector (no {EXTRA_FILE}); "
                          f"{expected}.")
    try:
        return program, json.loads(extra[EXTRA_FILE])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not an exported oodtune detector (its {EXTRA_FILE} is not JSON: {exc}); "
                          f"{expected}.") from None
