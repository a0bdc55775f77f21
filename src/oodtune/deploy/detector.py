"""A deployable OOD detector: one classifier, one score, one threshold, and the record of how it was set.

:class:`Detector` answers "is this image out-of-distribution?" for tensors, numpy arrays, PIL images, paths,
folders, globs and archives. It holds the network, its input normalisation and resolution, a post-hoc score
(higher = more in-distribution, :mod:`oodtune.scores`) and, once calibrated, a threshold t:

    is_ood(x) = score(x) < t.

**Calibration** (:meth:`Detector.calibrate`) sets t on ID images the model never trained on: t is the k-th
largest of their n scores, k = ceil(tpr * n) (:func:`oodtune.metrics.threshold_at_tpr`: the operating point of
FPR at ``tpr`` TPR with ID positive), so at least ``tpr`` of them are accepted. On new ID images from the same
distribution the acceptance rate is then k / (n + 1) in expectation, with standard deviation
sqrt(k (n + 1 - k) / ((n + 1)^2 (n + 2))) (the Beta(k, n + 1 - k) law of an order statistic); calibration
refuses sets smaller than :func:`oodtune.metrics.min_calibration_size`. Mahalanobis and kNN are first ``fit``
on ID *training* images; the detector records where both sets came from.

**With a guarantee** (``calibrate(..., confidence=0.99)``): t is the order statistic that accepts >= ``tpr`` of
new ID images with probability >= ``confidence`` over the draw of the calibration set (:mod:`oodtune.deploy.guarantee`,
:mod:`oodtune.metrics.conformal`); the point estimate is recorded beside it. Either way the detector keeps the
calibration scores, so :meth:`Detector.predict` gives each image a conformal p-value and, with ``fdr``, flags a
batch by Benjamini–Hochberg.

A detector is saved as JSON (``save``/``load``): score, threshold, calibration record, normalisation, and the
SHA-256 of the network's weights, so a detector is never applied to another model (:class:`CheckpointError`).
Fitted statistics (Mahalanobis, kNN) go to a sidecar ``.pt`` file of plain tensors (read ``weights_only``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..data.imageset import ImageSet
from ..data.inputs import as_uint8_images, decode_batches
from ..data.tensors import Normalizer
from ..errors import CheckpointError, ConfigError, DataError, OodtuneError
from ..evaluation.classification import Outputs, compute_outputs, score_dataset
from ..metrics import acceptance_rate
from ..models import FeatureModel, load_feature_model, weights_hash
from ..scores import Score, Shaper, build_score
from ..utils.atomic import write_atomic, write_text_atomic
from ..utils.progress import format_rate, progress_bar
from ..utils.runtime import current_inference_precision, resolve_device, resolve_precision
from .guarantee import Guarantee
from .record import DETECTOR_FORMAT, DETECTOR_VERSION, check_state_value, validate_record

__all__ = ["DETECTOR_FORMAT", "Calibration", "Detector", "Predictions"]

log = logging.getLogger(__name__)

RULE = "is_ood = score < threshold (score: higher = more in-distribution)"


@dataclass(frozen=True)
class Calibration:
    """How a detector's threshold was set (see the module docstring for the formulas)."""

    threshold: float
    tpr: float  # requested fraction of ID images accepted
    achieved: float  # fraction of the calibration images accepted (>= tpr)
    n: int  # calibration images
    data: str  # where they came from
    held_out: bool  # False: calibrated on training images (biased: the threshold is too permissive)
    expected: float  # expected acceptance rate on new ID images, k / (n + 1)
    expected_std: float  # its standard deviation
    check: dict[str, Any] | None = None  # acceptance on a disjoint ID set: data, n, acceptance, std, z
    precision: str | None = None  # fp32 | bf16: the forward passes that scored them (None: older files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Predictions:
    """Per image: predicted class index, its softmax probability, the OOD score and (once calibrated) ``is_ood``
    and the conformal ``p_values`` (when the detector stores its calibration scores)."""

    labels: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32, max softmax probability
    scores: np.ndarray  # (N,) float32, higher = more in-distribution
    is_ood: np.ndarray | None  # (N,) bool, None before calibration
    classes: tuple[str, ...]
    threshold: float | None = None  # the calibrated threshold (None before calibration)
    p_values: np.ndarray | None = None  # (N,) float64 conformal p-values (oodtune.deploy.guarantee)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per image: path (from ``names``), predicted_class, confidence, score, margin (score -
        threshold: negative = flagged OOD; None before calibration), p_value, is_ood, error (None)."""
        names = list(names) if names is not None else [str(i) for i in range(len(self))]
        return [{"path": names[i], "predicted_class": self.classes[int(self.labels[i])],
                 "confidence": float(self.confidence[i]), "score": float(self.scores[i]),
                 "margin": None if self.threshold is None else float(self.scores[i]) - self.threshold,
                 "p_value": None if self.p_values is None else float(self.p_values[i]),
                 "is_ood": None if self.is_ood is None else bool(self.is_ood[i]), "error": None}
                for i in range(len(self))]


def _expected_acceptance(k: int, n: int) -> tuple[float, float]:
    """Mean and std of Beta(k, n + 1 - k): the acceptance rate of the k-th largest of n calibration scores."""
    a, b = k, n + 1 - k
    return a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def _checked_guarantee(record: Any, calibration: Calibration | None, path: Path) -> Guarantee:
    """The ``guarantee`` record of detector file ``path``, validated and consistent with its calibration."""
    guarantee = Guarantee.from_dict(record, where=f"{path}: guarantee")
    if calibration is None or (guarantee.threshold, guarantee.tpr, guarantee.n) != (
            calibration.threshold, calibration.tpr, calibration.n):
        raise ConfigError(f"{path}: the calibration (threshold, tpr, n) does not match the guarantee's "
                          f"({guarantee.threshold}, {guarantee.tpr}, {guarantee.n}) derived from the stored "
                          "calibration scores (a damaged or edited file); calibrate again.")
    return guarantee


C = TypeVar("C", bound=Calibration)


class Thresholded(Generic[C]):
    """What every detector shares once calibrated: the calibration record (``None`` before) and its threshold."""

    calibration: C | None
    device: torch.device
    _warned_precision: str | None = None  # the precision a mismatch was last warned about (once per precision)

    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration.threshold

    def calibrated(self) -> C:
        """The calibration record; a :class:`ConfigError` when there is none yet."""
        if self.calibration is None:
            raise ConfigError(f"the detector has no threshold yet: calibrate it ({type(self).__name__}.calibrate, or "
                              "`oodtune calibrate`) first.")
        return self.calibration

    def precision_now(self) -> str:
        """The precision this detector's forward passes run in now (fp32 | bf16): the enclosing
        :func:`~oodtune.utils.runtime.inference_precision` block's, resolved on its device."""
        return resolve_precision(self.device, current_inference_precision())

    def warn_precision(self) -> None:
        """Log a warning when the threshold was set on scores of another precision than this process's forward
        passes: bf16 and fp32 scores differ slightly, so the acceptance reached may differ from the recorded one."""
        cal = self.calibration
        now = self.precision_now()
        if cal is not None and cal.precision is not None and cal.precision != now != self._warned_precision:
            self._warned_precision = now
            log.warning("the threshold was set on %s scores but this run computes %s scores; the share of ID inputs "
                        "accepted may differ slightly from the calibration's (use --precision %s to match).",
                        cal.precision, now, cal.precision)


class Detector(Thresholded[Calibration]):
    """A classifier + post-hoc score + threshold (see the module docstring).

    ``model`` is any ``nn.Module`` returning logits (or a :class:`FeatureModel`); ``classes``, ``mean``/``std``
    (on [0, 1] pixels) and ``resolution`` say how it was trained; ``score`` is a name from
    :data:`oodtune.scores.SCORE_NAMES` or a :class:`Score`. ``checkpoint`` records where the weights came from.
    """

    def __init__(self, model: nn.Module, *, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 resolution: int, score: str | Score = "energy", head: str | None = None, device: str | None = None,
                 checkpoint: str | os.PathLike | None = None) -> None:
        self.net = model if isinstance(model, FeatureModel) else FeatureModel(model, head)
        self.classes = tuple(classes)
        if self.net.num_classes != len(self.classes):
            raise ConfigError(f"the model has {self.net.num_classes} outputs but {len(self.classes)} class names "
                              "were given.")
        self.normalizer = Normalizer(tuple(mean), tuple(std))
        self.resolution = int(resolution)
        self.head = head
        self.score_fn = build_score(score) if isinstance(score, str) else score
        self.device = resolve_device(device)
        self.net.to(self.device).eval()
        if self.score_fn.needs_head:  # ViM, Residual, shaped scores read the final layer
            self.score_fn.use_head(*self.net.head_parameters())
        self.checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        self.weights_sha256 = weights_hash(self.net.model)
        self.calibration: Calibration | None = None
        self.guarantee: Guarantee | None = None  # threshold choice + calibration scores (p-values)
        self.fit_source: str | None = None
        #: the scores of the last calibration (and of its check), for plots; not saved
        self.calibration_scores: tuple[np.ndarray, np.ndarray | None] | None = None

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, score: str | Score = "energy",
                        device: str | None = None) -> Detector:
        """The detector of an oodtune checkpoint (its classes, normalisation and resolution), not yet calibrated."""
        net, meta = load_feature_model(checkpoint)
        return cls(net, classes=meta.classes, mean=meta.mean, std=meta.std, resolution=meta.resolution, score=score,
                   head=meta.head, device=device, checkpoint=checkpoint)

    @property
    def score_name(self) -> str:
        return self.score_fn.name

    def __repr__(self) -> str:
        state = "uncalibrated" if self.calibration is None else f"threshold={self.calibration.threshold:.4g}"
        return f"Detector(score={self.score_name!r}, {state}, classes={len(self.classes)}, device={self.device})"

    # -- forward passes ------------------------------------------------------------------------------------
    def _imageset(self, images: Any) -> ImageSet:
        if isinstance(images, ImageSet) and images.resolution == self.resolution:
            return images
        return ImageSet(as_uint8_images(images, self.resolution), None, (), "images")

    def _outputs(self, ds: ImageSet, batch_size: int, show_progress: bool) -> Outputs:
        return compute_outputs(self.net, ds, self.normalizer, device=self.device, batch_size=batch_size,
                               show_progress=show_progress)

    def _scores(self, ds: ImageSet, out: Outputs, show_progress: bool) -> np.ndarray:
        return score_dataset(self.score_fn, self.net, ds, out, self.normalizer, show_progress=show_progress)

    def score(self, images: Any, *, batch_size: int = 256, show_progress: bool = False) -> np.ndarray:
        """Scores (N,) of ``images`` (higher = more in-distribution); see :func:`~oodtune.data.inputs.as_uint8_images`
        for the accepted inputs."""
        ds = self._imageset(images)
        return self._scores(ds, self._outputs(ds, batch_size, show_progress), show_progress)

    def guaranteed(self) -> Guarantee:
        """The stored calibration scores; a :class:`ConfigError` for a detector calibrated without them."""
        if self.guarantee is None:
            raise ConfigError("this detector stores no calibration scores (made by an older oodtune), so it has no "
                              "p-values: calibrate it again (`oodtune calibrate`).")
        return self.guarantee

    def predict(self, images: Any, *, batch_size: int = 256, show_progress: bool = False,
                fdr: float | None = None) -> Predictions:
        """Class, confidence, score, conformal p-value and ``is_ood`` (None before calibration) of every image.

        ``is_ood`` is ``score < threshold``; with ``fdr`` it is instead the Benjamini–Hochberg decision over this
        batch at that false discovery rate (:mod:`oodtune.metrics.conformal`)."""
        self.warn_precision()
        ds = self._imageset(images)
        out = self._outputs(ds, batch_size, show_progress)
        probs = out.logits.softmax(dim=1)
        conf, labels = probs.max(dim=1)
        scores = self._scores(ds, out, show_progress)
        p_values = None if self.guarantee is None else self.guarantee.p_values(scores)
        if fdr is not None:
            is_ood: np.ndarray | None = self.guaranteed().flag_fdr(scores, fdr)
        else:
            is_ood = None if self.calibration is None else scores < self.calibration.threshold
        return Predictions(labels.cpu().numpy(), conf.float().cpu().numpy(), scores, is_ood, self.classes,
                           self.threshold, p_values)

    def predict_files(self, inputs: Iterable[str | os.PathLike], *, batch_size: int = 256,
                      workers: int | None = None, fdr: float | None = None,
                      skipped: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
        """One row per input file (files, folders, globs, archives; see :mod:`oodtune.data.inputs`), in order, as
        :meth:`Predictions.rows`; a file that cannot be read is a row with ``error`` set and the other fields
        None. With ``fdr``, ``is_ood`` is the Benjamini–Hochberg decision over *all* the inputs: the rows are
        then held (not the images) and come out after the last input. ``skipped`` counts the non-image files
        passed over in folders, archives and glob matches."""
        rows = self._predict_rows(inputs, batch_size, workers, skipped)
        if fdr is None:
            yield from rows
            return
        guarantee = self.guaranteed()
        held = list(rows)
        scores = np.array([np.nan if r["score"] is None else r["score"] for r in held], dtype=np.float64)
        flagged = guarantee.flag_fdr(scores, fdr)
        for row, flag in zip(held, flagged, strict=True):
            yield row if row["error"] else {**row, "is_ood": bool(flag)}

    def _predict_rows(self, inputs: Iterable[str | os.PathLike], batch_size: int,
                      workers: int | None, skipped: Counter[str] | None) -> Iterator[dict[str, Any]]:
        with progress_bar("predict", total=None) as bar:
            t0, done = time.perf_counter(), 0
            for batch in decode_batches(inputs, self.resolution, batch_size, workers, skipped=skipped):
                pixels = [d.pixels for d in batch if d.pixels is not None]
                names = [d.name for d in batch if d.pixels is not None]
                rows = iter(self.predict(np.stack(pixels), batch_size=batch_size).rows(names) if pixels else [])
                for d in batch:
                    yield next(rows) if d.pixels is not None else {
                        "path": d.name, "predicted_class": None, "confidence": None, "score": None, "margin": None,
                        "p_value": None, "is_ood": None, "error": d.error}
                done += len(batch)
                bar.advance(len(batch))
                bar.update(rate=format_rate(done, time.perf_counter() - t0))

    # -- fitting and calibration ---------------------------------------------------------------------------
    def fit(self, images: Any, labels: Any, *, source: str = "given training images",
            batch_size: int = 256) -> Detector:
        """Fit the score's ID statistics (Mahalanobis, kNN) on labelled ID *training* images; ``source`` is
        recorded. A no-op fit for scores without statistics."""
        ds = self._imageset(images)
        y = torch.as_tensor(np.asarray(labels)).long().flatten()
        if y.numel() != len(ds):
            raise DataError(f"{y.numel()} labels for {len(ds)} images; pass one label per image.")
        out = self._outputs(ds, batch_size, show_progress=True)
        self.score_fn.fit(out.logits, out.features, y.to(out.logits.device))
        self.fit_source = source
        return self

    def calibrate(self, id_images: Any, tpr: float = 0.95, *, data: str = "given ID images", held_out: bool = True,
                  check_images: Any = None, check_data: str = "given check images", confidence: float | None = None,
                  batch_size: int = 256) -> Calibration:
        """Set the threshold so that ``tpr`` of ``id_images`` -- ID images the model never trained on -- are
        accepted (module docstring). With ``confidence``, the threshold is instead the order statistic that
        accepts >= ``tpr`` of new ID images with probability >= ``confidence`` (:mod:`oodtune.deploy.guarantee`; both
        thresholds are kept in :attr:`guarantee`, with the calibration scores for p-values). ``held_out=False``
        records that they are training images (a biased, too permissive threshold). ``check_images``, a disjoint
        ID set, measures the acceptance rate reached on new data (recorded with its binomial std and its z-score
        against the expectation)."""
        scores = self.score(id_images, batch_size=batch_size, show_progress=True)
        guarantee = Guarantee.from_scores(scores, tpr, confidence)
        threshold = guarantee.threshold
        achieved, _ = acceptance_rate(scores, threshold)
        expected, expected_std = _expected_acceptance(guarantee.rank, scores.size)
        check, check_scores = None, None
        if check_images is not None:
            check_set = self._imageset(check_images)
            check_scores = self.score(check_set, batch_size=batch_size, show_progress=True)
            rate, std = acceptance_rate(check_scores, threshold)
            combined = math.sqrt(expected_std ** 2 + expected * (1 - expected) / len(check_set))
            check = {"data": check_data, "n": len(check_set), "acceptance": rate, "std": std,
                     "z": (rate - expected) / combined}
        self.calibration = Calibration(threshold, tpr, achieved, int(scores.size), data, held_out, expected,
                                       expected_std, check, self.precision_now())
        self.calibration_scores = (scores, check_scores)
        self.guarantee = guarantee
        return self.calibration

    # -- files ---------------------------------------------------------------------------------------------
    def _statistics(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The score's state: (JSON-able attributes, tensor attributes), keyed by attribute path (``score.x``,
        ``shapers.0.threshold`` for the parts of a shaped score)."""
        plain: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}

        def collect(obj: object, prefix: str) -> None:
            for key, value in vars(obj).items():
                if isinstance(value, torch.Tensor):
                    tensors[prefix + key] = value.detach().cpu()
                elif value is None or isinstance(value, (bool, int, float, str)):
                    plain[prefix + key] = value
                elif isinstance(value, (Score, Shaper)):
                    collect(value, f"{prefix}{key}.")
                elif isinstance(value, list) and all(isinstance(v, Shaper) for v in value):
                    for i, part in enumerate(value):
                        collect(part, f"{prefix}{key}.{i}.")
                else:
                    raise ConfigError(f"cannot save the {type(value).__name__} attribute {prefix + key!r} of score "
                                      f"{self.score_name}; only numbers, strings and tensors are saved.")

        collect(self.score_fn, "")
        return plain, tensors

    def _restore(self, state: dict[str, Any], source: str | os.PathLike = "the saved detector") -> None:
        """Set the score's attributes from a :meth:`_statistics` state (attribute paths as keys); a value of
        another kind than the attribute it replaces is refused, naming ``source``."""
        for path, value in state.items():
            *parts, attr = path.split(".")
            obj: Any = self.score_fn
            try:
                for part in parts:
                    obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
            except (AttributeError, IndexError, ValueError):
                raise ConfigError(f"{source}: the saved score state names {path!r}, which score {self.score_name} "
                                  "does not have; calibrate again.") from None
            if not isinstance(value, torch.Tensor):
                check_state_value(source, path, getattr(obj, attr, None), value)
            setattr(obj, attr, value)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the detector as JSON to ``path`` (and ``PATH.stats.pt`` with fitted tensors, if any)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
        plain, tensors = self._statistics()
        stats = path.with_name(path.stem + ".stats.pt") if tensors else None
        if stats is not None:
            write_atomic(stats, lambda fh: torch.save(tensors, fh))
        record = {
            "format": DETECTOR_FORMAT, "version": DETECTOR_VERSION, "oodtune_version": __version__,
            "task": "classification", "checkpoint": self.checkpoint, "weights_sha256": self.weights_sha256,
            "classes": list(self.classes),
            "mean": list(self.normalizer.mean), "std": list(self.normalizer.std), "resolution": self.resolution,
            "head": self.head, "score": self.score_name, "score_state": plain,
            "statistics": None if stats is None else stats.name, "fit_source": self.fit_source, "rule": RULE,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "guarantee": None if self.guarantee is None else self.guarantee.to_dict(),
        }
        return write_text_atomic(path, json.dumps(record, indent=2) + "\n", overwrite=True)

    @staticmethod
    def read_record(path: str | os.PathLike) -> dict[str, Any]:
        """The JSON record of a saved detector, validated field by field (:mod:`oodtune.deploy.record`)."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a detector file; name the JSON file `oodtune calibrate "
                              "--out` wrote.")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; make one with `oodtune calibrate`.")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not a detector file (invalid JSON: {exc}).") from None
        validate_record(record, path)
        try:
            build_score(record["score"])
        except OodtuneError as exc:
            raise ConfigError(f"{path}: field 'score' names no score oodtune has ({exc}); calibrate again.") from None
        return record

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | os.PathLike | nn.Module | None = None, *,
             device: str | None = None) -> Detector:
        """A saved detector applied to ``model``: a checkpoint path (default: the one it records) or the
        ``nn.Module`` it was made for. Refused when the weights differ from those it was calibrated on."""
        path = Path(path)
        record = cls.read_record(path)
        if record.get("task", "classification") != "classification":
            raise ConfigError(f"{path} is a detector for a {record['task']} checkpoint; load it with "
                              "oodtune.deploy.pixel_detector.SegmentationDetector.load (the CLI picks it itself).")
        source = model if model is not None else record.get("checkpoint")
        if source is None:
            raise ConfigError(f"{path} was made for an in-memory model; pass that model: Detector.load(path, model).")
        if isinstance(source, nn.Module):
            det = cls(source, classes=record["classes"], mean=record["mean"], std=record["std"],
                      resolution=record["resolution"], score=record["score"], head=record.get("head"), device=device)
        else:
            det = cls.from_checkpoint(source, score=record["score"], device=device)
        if det.weights_sha256 != record["weights_sha256"]:
            made_for = record.get("checkpoint") or "an in-memory model"
            raise CheckpointError(
                f"{path} was calibrated for other weights (sha256 {record['weights_sha256'][:12]}..., "
                f"{made_for}) than {source if not isinstance(source, nn.Module) else 'this model'} "
                f"(sha256 {det.weights_sha256[:12]}...). A threshold only holds for the model it was set on: "
                "calibrate a detector for this checkpoint (`oodtune calibrate CHECKPOINT --out DETECTOR.json`), or "
                "use the checkpoint the detector was made for.")
        det._restore(record.get("score_state") or {}, path)
        if record.get("statistics"):
            stats = path.with_name(record["statistics"])
            try:
                tensors = torch.load(stats, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError) as exc:
                raise CheckpointError(f"cannot read the fitted statistics {stats} of {path}: {exc}; keep the "
                                      "two files together, or calibrate again.") from None
            det._restore(tensors, stats)
        det.fit_source = record.get("fit_source")
        if record.get("calibration") is not None:
            det.calibration = Calibration(**record["calibration"])
        if record.get("guarantee") is not None:
            det.guarantee = _checked_guarantee(record["guarantee"], det.calibration, path)
        return det
