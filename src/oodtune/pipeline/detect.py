"""Detector steps: calibrate a threshold on held-out ID data, predict on a user's files.

Which ID images set the threshold (``data``), in order of preference for ``"auto"``:

1. the validation part held out of the train split before pretraining (``pretrain --val-fraction``, recorded
   in the checkpoint; never trained on, by pretraining or any fine-tuning);
2. the dataset's own validation split (``val/``: Tiny ImageNet, a ``folder:`` tree with ``val/``);
3. otherwise nothing: the user names a folder of held-out ID images (``folder:PATH`` / ``images:PATH``), or
   insists on ``"train"`` -- accepted with a warning and recorded as biased, because scores of training images
   are optimistic and the threshold then accepts fewer new ID images than requested.

The ID *test* split is never used to choose the threshold; it is the set on which the acceptance rate reached is
checked (recorded in the detector). Its disjointness from the calibration images is verified by content: test
images that are also calibration images (e.g. ``images:DIR`` holding copies of test images) are left out of the
check, with a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageSet
from ..data.registry import canonical_name, resolve_dataset
from ..deploy.detector import Detector
from ..deploy.pixel_detector import SegmentationDetector
from ..errors import ConfigError, DataError
from ..models import RunMeta, load_feature_model, read_meta
from .classification import id_parts, id_test_set, id_train_set
from .pixel_detect import calibrate_segmenter
from .source import DataSource, as_source, with_id_data

__all__ = ["CALIBRATION_CHOICES", "calibrate", "calibration_set", "disjoint_check_set", "predict", "with_id_data"]

log = logging.getLogger(__name__)

#: Values of ``data`` besides a folder:/images: path.
CALIBRATION_CHOICES = ("auto", "val", "train")


def _validation(meta: RunMeta, source: DataSource) -> tuple[ImageSet, str]:
    if meta.val_fraction:  # a data root without the dataset fails here, with the root named (not re-worded below)
        val = id_parts(meta, source)[1]
        if val is not None:
            return val, (f"{meta.dataset}: validation part held out of the train split before training "
                         f"({meta.val_fraction:.0%}, seed {meta.data_seed})")
    try:
        if meta.test_fraction:  # a folder without split folders: its "val" would be the whole folder
            raise DataError(f"{meta.dataset} has no validation split and none was held out")
        return source.load(meta.dataset, "val", meta.resolution), f"{meta.dataset}: its validation split"
    except DataError as exc:
        raise DataError(
            f"no held-out ID images to calibrate on ({exc}; data root searched: {source.root}, set with "
            "data_root= or env OODTUNE_DATA). Fix: pretrain with --val-fraction 0.1 (held out before training, "
            "recorded in the checkpoint), or name held-out ID images with --calibration-data folder:PATH (or "
            "images:PATH); --calibration-data train uses training images (biased).") from None


def calibration_set(meta: RunMeta, data: str | None, source: DataSource) -> tuple[ImageSet, str, bool]:
    """(images, description, held_out) to calibrate on; see the module docstring for ``data``."""
    choice = "auto" if data is None else data
    if choice in ("auto", "val"):
        ds, what = _validation(meta, source)
        return ds, what, True
    if choice == "train":
        log.warning("calibrating on the training images the model was fitted to: their scores are optimistic, so "
                    "the threshold will accept fewer new ID images than requested (recorded as held_out=false).")
        return id_train_set(meta, source), f"{meta.dataset}: training split (not held out: biased)", False
    if choice == "test":
        raise ConfigError(f"--calibration-data {choice}: the ID test split measures the detector and must not choose "
                          f"its threshold; use {', '.join(CALIBRATION_CHOICES)} or folder:PATH of held-out ID images.")
    if not canonical_name(choice).startswith(("folder:", "images:")):
        raise ConfigError(f"--calibration-data {choice!r}: use one of {', '.join(CALIBRATION_CHOICES)}, or "
                          "folder:PATH / images:PATH naming held-out ID images.")
    named = resolve_dataset(choice, source.root)
    if named.split(":", 1)[1] == meta.dataset.split(":", 1)[-1]:
        raise ConfigError(f"--calibration-data {choice} is the dataset the model was trained on (its held-out parts "
                          "included); use --calibration-data val, or name other held-out ID images.")
    return source.load(named, "all", meta.resolution), named, True


def calibrate(checkpoint: str | Path, *, score: str = "energy", tpr: float = 0.95, data: str | None = None,
              data_root: DataSource | str | Path | None = None, device: str | None = None,
              id_data: str | None = None, check: bool = True, blur: bool = False, confidence: float | None = None
              ) -> Detector | SegmentationDetector:
    """A :class:`Detector` of ``checkpoint`` with ``score``, its threshold set to accept ``tpr`` of held-out ID
    images (``data``, module docstring) -- with ``confidence``, to accept >= ``tpr`` of new ID images with that
    probability (:mod:`oodtune.deploy.guarantee`); Mahalanobis/kNN statistics fitted on the ID train split first.
    With ``check``, the acceptance rate reached is measured on the ID test split and recorded. A segmentation
    checkpoint gets a :class:`SegmentationDetector` with a pixel threshold
    (:func:`~.pixel_detect.calibrate_segmenter`; ``blur`` as ``evaluate --blur``; no ``confidence``: the pixels
    of a frame are not independent draws, so the order-statistic bound does not hold for them)."""
    if read_meta(checkpoint).task == "segmentation":
        if confidence is not None:
            raise ConfigError("--confidence bounds the acceptance of new images from independent calibration images; "
                              "the pixels of a frame are not independent, so a segmenter's pixel threshold has no such "
                              "guarantee: drop --confidence.")
        return calibrate_segmenter(checkpoint, score=score, tpr=tpr, data=data, data_root=data_root, device=device,
                                   id_data=id_data, check=check, blur=blur)
    if blur:
        raise ConfigError("--blur smooths per-pixel maps of segmentation checkpoints; drop it for a classifier.")
    source = as_source(data_root)
    net, meta = load_feature_model(checkpoint)
    meta = with_id_data(meta, id_data, source)
    det = Detector(net, classes=meta.classes, mean=meta.mean, std=meta.std, resolution=meta.resolution, score=score,
                   head=meta.head, device=device, checkpoint=checkpoint)
    images, what, held_out = calibration_set(meta, data, source)
    if det.score_fn.needs_fit:
        train = id_train_set(meta, source)
        det.fit(train, train.labels, source=f"{meta.dataset}: training split as the checkpoint records it "
                                            f"({len(train)} images)")
    test, check_data = disjoint_check_set(id_test_set(meta, source), images, meta.dataset) if check else (None, "")
    det.calibrate(images, tpr, data=what, held_out=held_out, check_images=test, check_data=check_data,
                  confidence=confidence)
    return det


def disjoint_check_set(test: ImageSet, calibration: ImageSet, dataset: str) -> tuple[ImageSet | None, str]:
    """(the ID test images that are not calibration images, their description): disjointness is verified by
    content (same pixels, :meth:`~oodtune.data.ImageSet.shared_with`); shared images are left out of the check with
    a warning, and no check remains (None) when every test image is shared."""
    shared = test.shared_with(calibration)
    k, n = int(shared.sum()), len(test)
    if k == 0:
        return test, f"{dataset}: ID test set ({n} images; disjoint from the calibration images, verified by content)"
    if k == n:
        log.warning("all %d ID test images are also calibration images (same pixels): the acceptance rate cannot be "
                    "checked on new images; calibrate on held-out images that are not test images.", n)
        return None, ""
    log.warning("%d of the %d ID test images are also calibration images (same pixels); the check leaves them out "
                "(calibrate on held-out images that are not test images).", k, n)
    return test.subset(np.flatnonzero(~shared)), (
        f"{dataset}: ID test set without the {k} of its {n} images that are also calibration images ({n - k} images; "
        "disjoint from the calibration images, verified by content)")


def predict(checkpoint: str | Path, inputs: Sequence[str], *, detector: str | Path, device: str | None = None,
            batch_size: int = 256, skipped: Counter[str] | None = None, fdr: float | None = None
            ) -> Iterator[dict[str, Any]]:
    """Rows (path, predicted_class, confidence, score, margin, p_value, is_ood, error) for every input file;
    ``detector`` (a saved detector) must have been calibrated for ``checkpoint``'s weights; ``skipped`` counts the
    non-image files passed over. With ``fdr``, ``is_ood`` is the Benjamini–Hochberg decision over all inputs at
    that false discovery rate (:meth:`Detector.predict_files`). Segmentation checkpoints:
    :func:`~.pixel_detect.predict_frames`."""
    det = Detector.load(detector, checkpoint, device=device)
    det.calibrated()
    if fdr is not None:
        det.guaranteed()  # refuse before any forward pass
    return det.predict_files(inputs, batch_size=batch_size, fdr=fdr, skipped=skipped)
