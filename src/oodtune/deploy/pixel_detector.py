"""A deployable anomaly segmenter: one segmentation network, one per-pixel score, one pixel threshold, and the
record of how it was set.

:class:`SegmentationDetector` turns a frame into a class map, an anomaly map and a binary anomaly mask. Every
pixel gets the score's formula on its K class logits (:func:`oodtune.scores.score_map`; higher = more
in-distribution; optionally Gaussian-blurred, kernel 7, sigma 1, as ``evaluate --blur``), and with the
threshold t:

    anomaly(pixel) = t - score(pixel),     mask(pixel) = anomaly(pixel) > 0   (i.e. score < t).

**Calibration** (:meth:`SegmentationDetector.calibrate`) sets t on the non-void pixels of ID frames the model
never trained on (the ID data set's validation split; never its test split): t is the k-th largest of their n
pixel scores, k = ceil(tpr * n) (:func:`oodtune.metrics.threshold_at_tpr`), so at least ``tpr`` of those pixels
are accepted. Pixels of one frame are not independent, so the acceptance rate expected on new frames is the
rate reached (``expected`` = ``achieved``) and its standard error is that of a ratio estimator over frames
(pixels clustered by frame, F frames with m_f pixels and acceptance a_f at t):

    se = sqrt(F / (F - 1) * sum_f m_f^2 (a_f - p)^2) / sum_f m_f.

The **check** measures the acceptance on the ID test frames (disjoint) with the same standard error, and its
z-score against the expectation (combined standard errors), as the classifier's detector does.

**Outputs** are computed by one module, :class:`SegmentationProgram` (uint8 frames in; class map, anomaly map,
mask out), which the Python path runs eagerly and :meth:`SegmentationDetector.export` captures with
``torch.export``, so both give the same maps. A detector is saved as the same JSON record as the classifier's
(:mod:`oodtune.deploy.detector`), with ``task: segmentation``, and applies only to the weights it was calibrated on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .. import __version__
from ..data.frames import decode_frame, frame_batches
from ..data.inputs import DecodedInput
from ..data.segmentation import SegmentationSet, anomaly_size
from ..errors import CheckpointError, ConfigError, DataError, ModelError
from ..functional import gaussian_blur
from ..metrics import threshold_at_tpr
from ..models import SegmentationModel, load_model, weights_hash
from ..scores import PIXEL_SCORE_NAMES, LogitScore, build_score
from ..utils.atomic import write_atomic, write_text_atomic
from ..utils.progress import format_rate, progress_bar
from ..utils.runtime import autocast, resolve_device
from .detector import DETECTOR_FORMAT, DETECTOR_VERSION, Calibration, Detector, Thresholded

__all__ = ["ANOMALY_PNG_ZERO", "PIXEL_RULE", "PROGRAM_OUTPUTS", "FramePrediction", "PixelCalibration",
           "SegmentationDetector", "SegmentationProgram", "frame_summary"]

PIXEL_RULE = ("anomaly = threshold - score; a pixel is anomalous when anomaly > 0, i.e. score < threshold "
              "(score: higher = more in-distribution)")
#: The 16-bit PNG value of anomaly 0 (the threshold): value = ANOMALY_PNG_ZERO + round(map_scale * anomaly).
ANOMALY_PNG_ZERO = 32768
#: Share of the 16-bit range on either side of the threshold that the calibration pixels' central 99.8 % fill.
MAP_SPREAD_LEVELS = 16384
#: The extra file of an exported detector (as for classifiers; :func:`oodtune.deploy.export.load_exported` reads both).
EXTRA_FILE = "oodtune_detector.json"
#: Pixel scores kept (seeded sample) for the calibration histogram.
PLOT_SAMPLE = 100_000
#: The outputs of :class:`SegmentationProgram`, in order (the names an exported program gives them).
PROGRAM_OUTPUTS = ("class_map", "anomaly", "mask")
#: Connected components of the mask are 8-connected.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PixelCalibration(Calibration):
    """How a pixel threshold was set: :class:`~oodtune.deploy.detector.Calibration` with ``n`` = calibration pixels,
    ``expected`` = ``achieved`` and ``expected_std`` = the frame-clustered standard error (module docstring), plus
    the frames, the blur and the 16-bit scaling of anomaly maps."""

    frames: int = 0
    blur: bool = False
    map_scale: float = 1.0  # 16-bit PNG levels per score unit (see ANOMALY_PNG_ZERO)
    unit: str = "pixels"


@dataclass(frozen=True)
class FramePrediction:
    """One frame's outputs at the size it was processed at (the model's input height, the frame's aspect)."""

    class_map: np.ndarray  # (H, W) int64, argmax over the K classes
    anomaly: np.ndarray  # (H, W) float32, threshold - score
    mask: np.ndarray  # (H, W) bool, anomaly > 0


def frame_summary(pred: FramePrediction, classes: Sequence[str]) -> dict[str, Any]:
    """The JSON-able summary of one frame: size, anomalous-pixel share, number and sizes (pixels, largest first)
    of the 8-connected anomalous components, largest anomaly, and the predicted-class histogram (pixels)."""
    labelled, count = ndimage.label(pred.mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labelled.ravel())[1:] if count else np.zeros(0, np.int64)
    hist = np.bincount(pred.class_map.ravel(), minlength=len(classes))
    return {"width": int(pred.mask.shape[1]), "height": int(pred.mask.shape[0]),
            "anomalous_share": float(pred.mask.mean()), "components": int(count),
            "component_pixels": sorted((int(s) for s in sizes), reverse=True),
            "max_anomaly": float(pred.anomaly.max()),
            "class_pixels": {c: int(n) for c, n in zip(classes, hist, strict=False) if n}}


class SegmentationProgram(nn.Module):
    """uint8 frames (N, H, W, 3) RGB -> (class map (N, H, W) int64, anomaly map (N, H, W) float32, mask (N, H, W)
    bool); normalisation, network, per-pixel score, blur and threshold inside (module docstring). ``precision``
    bf16 runs the network under bf16 autocast (the logits, scores and threshold stay fp32); an exported program is
    fp32."""

    mean: torch.Tensor
    std: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, net: SegmentationModel, score: LogitScore, *, mean: Sequence[float], std: Sequence[float],
                 bgr: bool, blur: bool, threshold: float, precision: str = "fp32") -> None:
        super().__init__()
        self.precision = precision
        self.net = net
        self.score = score
        self.bgr, self.blur, self.num_classes = bgr, blur, net.num_classes
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    def scores(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class map, per-pixel score) of uint8 (N, H, W, 3) frames."""
        x = frames.permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        with autocast(frames.device, self.precision):
            logits = self.net((x.float() / 255.0 - self.mean) / self.std)
        logits = logits.float()
        n, _, h, w = logits.shape
        k = self.num_classes
        flat = logits[:, :k].permute(0, 2, 3, 1).reshape(-1, k)
        score = self.score.from_logits(flat).reshape(n, h, w)
        if self.blur:
            score = gaussian_blur(score)
        return logits[:, :k].argmax(1), score

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        classes, score = self.scores(frames)
        anomaly = self.threshold - score
        return classes, anomaly, anomaly > 0


def _clustered_rate(accepted: Sequence[int], pixels: Sequence[int]) -> tuple[float, float]:
    """(pooled acceptance p, its frame-clustered standard error; module docstring)."""
    a, m = np.asarray(accepted, np.float64), np.asarray(pixels, np.float64)
    p = float(a.sum() / m.sum())
    f = len(m)
    se = math.sqrt(f / (f - 1) * float(np.sum((a - p * m) ** 2))) / float(m.sum()) if f > 1 else float("nan")
    return p, se


class SegmentationDetector(Thresholded[PixelCalibration]):
    """A segmentation network + per-pixel score + pixel threshold (see the module docstring).

    ``model`` is any ``nn.Module`` returning (B, K + extra, H, W) logits (or a :class:`SegmentationModel`);
    ``classes`` are its K classes, ``mean``/``std`` (on [0, 1] pixels, in the model's channel order) and ``bgr``
    its input normalisation, ``input_size`` = (width, height) it was trained at (frames are fed at that height,
    :mod:`oodtune.data.frames`); ``score`` one of :data:`oodtune.scores.PIXEL_SCORE_NAMES`; ``blur`` as
    ``evaluate --blur``.
    """

    task = "segmentation"

    def __init__(self, model: nn.Module, *, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 input_size: tuple[int, int], bgr: bool = False, extra_channels: int = 0, score: str = "energy",
                 blur: bool = False, device: str | None = None, checkpoint: str | os.PathLike | None = None) -> None:
        if score not in PIXEL_SCORE_NAMES:
            raise ConfigError(f"score {score!r} is not a pixel score; segmentation supports "
                              f"{', '.join(PIXEL_SCORE_NAMES)}.")
        self.classes = tuple(classes)
        self.net = model if isinstance(model, SegmentationModel) else \
            SegmentationModel(model, len(self.classes), extra_channels)
        self.mean, self.std, self.bgr = tuple(mean), tuple(std), bool(bgr)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.score_name, self.blur = score, bool(blur)
        self.device = resolve_device(device)
        self.net.to(self.device).eval()
        self.checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        self.weights_sha256 = weights_hash(self.net.model)
        self.calibration: PixelCalibration | None = None
        #: a seeded sample of the last calibration's pixel scores (and of its check's), for plots; not saved
        self.calibration_scores: tuple[np.ndarray, np.ndarray | None] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, score: str = "energy", *, blur: bool = False,
                        device: str | None = None) -> SegmentationDetector:
        """The detector of an oodtune segmentation checkpoint, not yet calibrated."""
        model, meta = load_model(checkpoint)
        if meta.task != "segmentation" or meta.input_size is None:
            raise ConfigError(f"{checkpoint} is a {meta.task} checkpoint; SegmentationDetector needs a segmentation "
                              "one (use Detector for classifiers).")
        net = SegmentationModel(model, meta.num_classes, meta.extra_channels, meta.trainable)
        return cls(net, classes=meta.classes, mean=meta.mean, std=meta.std, input_size=meta.input_size,
                   bgr=meta.channel_order == "bgr", score=score, blur=blur, device=device, checkpoint=checkpoint)

    def __repr__(self) -> str:
        state = "uncalibrated" if self.calibration is None else f"threshold={self.calibration.threshold:.4g}"
        return (f"SegmentationDetector(score={self.score_name!r}, blur={self.blur}, {state}, "
                f"classes={len(self.classes)}, device={self.device})")

    # -- forward passes ------------------------------------------------------------------------------------
    def program(self, threshold: float | None = None, precision: str = "fp32") -> SegmentationProgram:
        """The module that computes every output (module docstring), with ``threshold`` (default: the
        calibrated one; 0 before calibration), its network in ``precision`` (fp32 | bf16)."""
        if threshold is None:
            threshold = 0.0 if self.calibration is None else self.calibration.threshold
        score = build_score(self.score_name)
        if not isinstance(score, LogitScore):  # pragma: no cover - PIXEL_SCORE_NAMES are logit scores
            raise ConfigError(f"score {self.score_name!r} is not a pixel score.")
        return SegmentationProgram(self.net, score, mean=self.mean, std=self.std, bgr=self.bgr, blur=self.blur,
                                   threshold=threshold, precision=precision).to(self.device).eval()

    def frames(self, images: Any) -> list[np.ndarray]:
        """``images`` (a uint8 (H, W, 3) frame, an (N, H, W, 3) batch, a path, or a list of those) as uint8
        frames at the model's input height and their own aspect (:mod:`oodtune.data.frames`)."""
        height = self.input_size[1]
        if isinstance(images, (str, os.PathLike)):
            return [decode_frame(images, height)]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return [f for x in images for f in self.frames(x)]
        if isinstance(images, np.ndarray):
            if images.ndim != 3 or images.shape[2] != 3 or images.dtype != np.uint8:
                raise DataError(f"a frame must be a uint8 (H, W, 3) RGB array, got {images.dtype} {images.shape}.")
            size = anomaly_size((images.shape[1], images.shape[0]), height)
            if (images.shape[1], images.shape[0]) == size:
                return [images]
            from PIL import Image

            return [np.asarray(Image.fromarray(images).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)]
        if isinstance(images, (list, tuple)):
            return [f for x in images for f in self.frames(x)]
        raise DataError(f"cannot use a {type(images).__name__} as frames; pass uint8 (H, W, 3) arrays or paths.")

    @torch.no_grad()
    def _run(self, program: SegmentationProgram, frames: list[np.ndarray]) -> list[tuple[torch.Tensor, ...]]:
        """Program outputs per frame (on the CPU); frames of one size go through the network together."""
        out: list[tuple[torch.Tensor, ...]] = [()] * len(frames)
        for shape in dict.fromkeys(f.shape for f in frames):
            idx = [i for i, f in enumerate(frames) if f.shape == shape]
            batch = torch.from_numpy(np.stack([frames[i] for i in idx])).to(self.device)
            results = program(batch)
            if not torch.isfinite(results[1]).all():
                raise ModelError("the model produced NaN/inf scores; the checkpoint may be diverged.")
            for j, i in enumerate(idx):
                out[i] = tuple(r[j].cpu() for r in results)
        return out

    def score_maps(self, images: Any) -> list[np.ndarray]:
        """Per-pixel score maps (higher = more in-distribution) of ``images`` (:meth:`frames`)."""
        program = self.program(0.0, self.precision_now())
        return [(-o[1]).numpy() for o in self._run(program, self.frames(images))]

    def predict(self, images: Any) -> list[FramePrediction]:
        """Class map, anomaly map and mask of every frame of ``images`` (calibrated detectors only)."""
        self.calibrated()
        self.warn_precision()
        return [FramePrediction(o[0].numpy(), o[1].numpy(), o[2].numpy())
                for o in self._run(self.program(precision=self.precision_now()), self.frames(images))]

    def predict_files(self, inputs: Iterable[str | os.PathLike], *, batch_size: int = 8,
                      skipped: Counter[str] | None = None
                      ) -> Iterator[tuple[DecodedInput, FramePrediction | None]]:
        """(decoded input, its prediction or None when it could not be read) for every input file, in order,
        ``batch_size`` frames in memory at a time; ``skipped`` counts non-image files passed over."""
        program = self.program(self.calibrated().threshold, self.precision_now())
        self.warn_precision()
        with progress_bar("predict", total=None) as bar:
            t0, done = time.perf_counter(), 0
            for batch in frame_batches(inputs, self.input_size[1], batch_size, skipped=skipped):
                good = [d for d in batch if d.pixels is not None]
                results = iter(self._run(program, [d.pixels for d in good if d.pixels is not None]))
                for d in batch:
                    if d.pixels is None:
                        yield d, None
                    else:
                        o = next(results)
                        yield d, FramePrediction(o[0].numpy(), o[1].numpy(), o[2].numpy())
                done += len(batch)
                bar.advance(len(batch))
                bar.update(rate=format_rate(done, time.perf_counter() - t0))

    # -- calibration -----------------------------------------------------------------------------------------
    def _pixel_scores(self, data: SegmentationSet, batch_size: int) -> list[np.ndarray]:
        """Scores of the non-void pixels of every frame of ``data`` (one array per frame)."""
        if data.num_classes != len(self.classes):
            raise DataError(f"{data.name} has {data.num_classes} classes but the detector {len(self.classes)}.")
        program = self.program(0.0, self.precision_now())
        per_frame: list[np.ndarray] = []
        with progress_bar(f"scoring {data.name}", total=len(data)) as bar:
            for start in range(0, len(data), batch_size):
                frames = list(data.images[start : start + batch_size])
                for out, lab in zip(self._run(program, frames), data.labels[start : start + batch_size], strict=True):
                    keep = lab != (-1 if data.ignore_index is None else data.ignore_index)
                    per_frame.append((-out[1]).numpy()[keep])
                bar.advance(len(frames))
        return per_frame

    def calibrate(self, frames: SegmentationSet, tpr: float = 0.95, *, data: str = "given ID frames",
                  held_out: bool = True, check_frames: SegmentationSet | None = None,
                  check_data: str = "given check frames", batch_size: int = 8) -> PixelCalibration:
        """Set the pixel threshold so that ``tpr`` of the non-void pixels of ``frames`` -- labelled ID frames the
        model never trained on -- are accepted; ``check_frames`` (disjoint ID frames) measure the acceptance
        reached on new frames (module docstring)."""
        if len(frames) < 2:
            raise DataError(f"{len(frames)} calibration frame(s): at least 2 are needed to estimate how the "
                            "acceptance varies between frames; use more held-out ID frames.")
        per_frame = self._pixel_scores(frames, batch_size)
        scores = np.concatenate(per_frame)
        if scores.size == 0:
            raise DataError(f"every pixel of {data} is void; calibrate on labelled ID frames.")
        threshold, achieved = threshold_at_tpr(scores, tpr)
        _, expected_std = _clustered_rate([int((s >= threshold).sum()) for s in per_frame],
                                          [s.size for s in per_frame])
        low, high = np.quantile(scores, [0.001, 0.999])
        spread = max(threshold - float(low), float(high) - threshold, 1e-6)
        rng = np.random.default_rng(0)
        sample = rng.choice(scores, size=min(PLOT_SAMPLE, scores.size), replace=False)
        del scores
        check, check_sample = None, None
        if check_frames is not None:
            check_scores = self._pixel_scores(check_frames, batch_size)
            rate, std = _clustered_rate([int((s >= threshold).sum()) for s in check_scores],
                                        [s.size for s in check_scores])
            pooled = np.concatenate(check_scores)
            check_sample = rng.choice(pooled, size=min(PLOT_SAMPLE, pooled.size), replace=False)
            combined = math.sqrt(expected_std ** 2 + std ** 2)
            check = {"data": check_data, "n": int(sum(s.size for s in check_scores)), "frames": len(check_scores),
                     "acceptance": rate, "std": std, "z": (rate - achieved) / combined if combined > 0 else 0.0}
        self.calibration = PixelCalibration(
            threshold=threshold, tpr=tpr, achieved=achieved, n=int(sum(s.size for s in per_frame)), data=data,
            held_out=held_out, expected=achieved, expected_std=expected_std, check=check, frames=len(per_frame),
            precision=self.precision_now(), blur=self.blur, map_scale=MAP_SPREAD_LEVELS / spread)
        self.calibration_scores = (sample, check_sample)
        return self.calibration

    # -- files ---------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The detector's JSON record (what :meth:`save` writes and an exported program carries)."""
        return {
            "format": DETECTOR_FORMAT, "version": DETECTOR_VERSION, "oodtune_version": __version__,
            "task": self.task, "checkpoint": self.checkpoint, "weights_sha256": self.weights_sha256,
            "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
            "channel_order": "bgr" if self.bgr else "rgb", "input_size": list(self.input_size),
            "score": self.score_name, "blur": self.blur, "rule": PIXEL_RULE,
            "anomaly_png": {"zero": ANOMALY_PNG_ZERO, "levels_per_unit": None if self.calibration is None
                            else self.calibration.map_scale,
                            "formula": "anomaly = (value - zero) / levels_per_unit (clipped to 0..65535)"},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the detector as JSON to ``path``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
        return write_text_atomic(path, json.dumps(self.record(), indent=2) + "\n", overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | os.PathLike | None = None, *,
             device: str | None = None) -> SegmentationDetector:
        """A saved segmentation detector applied to the checkpoint ``model`` (default: the one it records);
        refused when the weights differ from those it was calibrated on."""
        record = Detector.read_record(path)
        if record.get("task") != cls.task:
            raise ConfigError(f"{path} is a detector for an image classifier, not a segmenter; calibrate one for the "
                              "segmentation checkpoint (`oodtune calibrate SEG.pt --out DETECTOR.json`).")
        source = model if model is not None else record.get("checkpoint")
        if source is None:
            raise ConfigError(f"{path} records no checkpoint; pass it: SegmentationDetector.load(path, checkpoint).")
        det = cls.from_checkpoint(source, record["score"], blur=bool(record.get("blur")), device=device)
        if det.weights_sha256 != record["weights_sha256"]:
            raise CheckpointError(
                f"{path} was calibrated for other weights (sha256 {record['weights_sha256'][:12]}..., "
                f"{record.get('checkpoint')}) than {source} (sha256 {det.weights_sha256[:12]}...). A threshold only "
                "holds for the model it was set on: calibrate a detector for this checkpoint (`oodtune calibrate "
                "CHECKPOINT --out DETECTOR.json`), or use the checkpoint the detector was made for.")
        if record.get("calibration") is not None:
            det.calibration = PixelCalibration(**record["calibration"])
        return det

    def frame_shapes(self) -> list[tuple[dict[int, Any], ...]]:
        """The dynamic shapes a program of this detector is captured with, tried in order: batch size and width
        (any multiple of 8, up to 8192), then batch size alone (the width fixed at the model's input width)."""
        batch = torch.export.Dim("batch", min=1)
        return [({0: batch, 2: 8 * torch.export.Dim("width_8", min=1, max=1024)},), ({0: batch},)]

    def program_record(self, dynamic_width: bool) -> dict[str, Any]:
        """The detector record an exported program carries: :meth:`record`, its input and its outputs."""
        w, h = self.input_size
        width = "W" if dynamic_width else str(w)
        return {**self.record(), "input": f"uint8 (N, {h}, {width}, 3) RGB" +
                (" (W: any multiple of 8)" if dynamic_width else ""), "outputs": list(PROGRAM_OUTPUTS)}

    def export(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the calibrated detector as a ``torch.export`` program (``.pt2``): uint8 (N, H, W, 3) RGB frames at
        the model's input height in (:mod:`oodtune.data.frames`; batch size dynamic, and the width too -- any
        multiple of 8 -- when the network exports so, else the trained width; :meth:`frame_shapes`), (class map,
        anomaly map, mask) out; the record rides along as the extra file ``EXTRA_FILE``
        (:func:`oodtune.deploy.export.load_exported` returns both)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
        self.calibrated()
        program = self.program().to("cpu")
        w, h = self.input_size
        example = torch.zeros(2, h, w, 3, dtype=torch.uint8)
        shapes = self.frame_shapes()
        try:
            with torch.no_grad():
                for i, dynamic in enumerate(shapes):  # any width (multiple of 8) when the network allows it
                    try:
                        exported = torch.export.export(program, (example,), dynamic_shapes=dynamic)
                        break
                    except Exception:  # torch.export raises many types; all mean "not capturable like this"
                        if i == len(shapes) - 1:
                            raise
        except Exception as exc:
            raise ModelError(f"torch.export cannot capture this model ({type(exc).__name__}: {str(exc)[:300]}); "
                             "serve the Python SegmentationDetector instead.") from exc
        finally:
            self.net.to(self.device)
        extra = {EXTRA_FILE: json.dumps(self.program_record(i == 0), indent=2)}
        return write_atomic(path, lambda fh: torch.export.save(exported, fh, extra_files=extra))
