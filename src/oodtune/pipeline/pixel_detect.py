"""Detector steps for segmenters: calibrate a pixel threshold on held-out ID frames, predict anomaly maps for a
user's frames (:mod:`oodtune.deploy.pixel_detector`).

Which ID frames set the threshold (``data``): ``auto`` / ``val`` = the validation split of the checkpoint's ID
data set (CamVid's 101 ``val`` frames; void pixels ignored); ``train`` = its training frames (accepted with a
warning, recorded as biased). The test split never sets the threshold; it is the disjoint set on which the
acceptance reached is checked.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data import SegmentationSet
from ..deploy.map_files import frame_files, write_frame_files
from ..deploy.pixel_detector import SegmentationDetector, frame_summary
from ..errors import CheckpointError, ConfigError
from ..models import RunMeta, read_meta
from .source import DataSource, as_source, with_id_data

__all__ = ["SEGMENTATION_CALIBRATION_CHOICES", "calibrate_segmenter", "predict_frames"]

log = logging.getLogger(__name__)

SEGMENTATION_CALIBRATION_CHOICES = ("auto", "val", "train")


def _frames(meta: RunMeta, source: DataSource, split: str) -> SegmentationSet:
    if meta.input_size is None:
        raise CheckpointError("a segmentation checkpoint must record its input_size; re-import the model.")
    return source.segmentation(meta.dataset, split, size=(meta.input_size[0], meta.input_size[1]))


def calibration_frames(meta: RunMeta, data: str | None, source: DataSource) -> tuple[SegmentationSet, str, bool]:
    """(labelled ID frames, description, held_out) to calibrate a pixel threshold on (module docstring)."""
    choice = "auto" if data is None else data
    if choice in ("auto", "val"):
        return _frames(meta, source, "val"), f"{meta.dataset}: its validation split (non-void pixels)", True
    if choice == "train":
        log.warning("calibrating on the training frames the model was fitted to: their scores are optimistic, so "
                    "the threshold will accept fewer new ID pixels than requested (recorded as held_out=false).")
        return _frames(meta, source, "train"), f"{meta.dataset}: training split (not held out: biased)", False
    if choice == "test":
        raise ConfigError(f"--calibration-data {choice}: the ID test frames measure the detector and must not choose "
                          f"its threshold; use {', '.join(SEGMENTATION_CALIBRATION_CHOICES)}.")
    raise ConfigError(f"--calibration-data {choice!r}: a segmentation threshold is set on labelled ID frames (void "
                      f"pixels left out); use {', '.join(SEGMENTATION_CALIBRATION_CHOICES)} (the ID data set's "
                      "splits; place another copy under --data-root and pass --id-data NAME to use it).")


def calibrate_segmenter(checkpoint: str | Path, *, score: str = "energy", tpr: float = 0.95,
                        data: str | None = None, data_root: DataSource | str | Path | None = None,
                        device: str | None = None, id_data: str | None = None, check: bool = True,
                        blur: bool = False) -> SegmentationDetector:
    """A :class:`SegmentationDetector` of ``checkpoint`` with the pixel ``score`` (``blur``: Gaussian-blurred
    maps, as ``evaluate --blur``), its threshold set to accept ``tpr`` of the non-void pixels of held-out ID frames
    (``data``, module docstring); with ``check``, the acceptance reached on the ID test frames is recorded."""
    source = as_source(data_root)
    meta = with_id_data(read_meta(checkpoint), id_data, source)
    if meta.task != "segmentation":
        raise ConfigError(f"{checkpoint} is a {meta.task} checkpoint, not a segmentation one.")
    det = SegmentationDetector.from_checkpoint(checkpoint, score, blur=blur, device=device)
    frames, what, held_out = calibration_frames(meta, data, source)
    test = _frames(meta, source, "test") if check else None
    det.calibrate(frames, tpr, data=what, held_out=held_out, check_frames=test,
                  check_data=f"{meta.dataset}: ID test frames (disjoint from the calibration frames; void ignored)")
    return det


def predict_frames(checkpoint: str | Path, inputs: Sequence[str], *, detector: str | Path, out: str | Path,
                   device: str | None = None, batch_size: int = 8, blur: bool | None = None,
                   map_format: str = "png", skipped: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """For every input frame: its anomaly map, mask and overlay written under ``out`` (:mod:`oodtune.deploy.map_files`)
    and one row (path, size, anomalous_share, components, component_pixels, max_anomaly, class_pixels,
    threshold, the written files, error). ``blur`` must match the detector's (None: the detector's)."""
    det = SegmentationDetector.load(detector, checkpoint, device=device)
    cal = det.calibrated()
    if blur is not None and blur != det.blur:
        raise ConfigError(f"{detector} was calibrated {'with' if det.blur else 'without'} --blur; its threshold holds "
                          f"only for such maps: drop --{'no-' if not blur else ''}blur, or calibrate a detector "
                          f"{'with' if blur else 'without'} --blur.")
    out = Path(out)
    empty = dict.fromkeys(("width", "height", "anomalous_share", "components", "component_pixels", "max_anomaly",
                           "class_pixels", *frame_files(out, 0, "x", map_format)))
    for index, (item, pred) in enumerate(det.predict_files(inputs, batch_size=batch_size, skipped=skipped)):
        if pred is None or item.pixels is None:
            yield {"path": item.name, **empty, "threshold": cal.threshold, "error": item.error}
            continue
        files = write_frame_files(out, index, item.name, item.pixels, pred, map_scale=cal.map_scale, fmt=map_format)
        yield {"path": item.name, **frame_summary(pred, det.classes), "threshold": cal.threshold,
               **{k: str(v) for k, v in files.items()}, "error": None}
