"""Evaluate a segmentation network: mIoU on the ID test split, and pixel-wise anomaly detection on anomaly sets.

Each frame goes through the network once per data set (eval mode, fp32, batches of ``batch_size`` frames); its
logits are turned into per-pixel scores (:func:`oodtune.scores.score_map`: the score's formula on each pixel's
K class logits, higher = more in-distribution), optionally Gaussian-blurred (kernel 7, σ 1, as PEBAL's test code
can), and streamed into :class:`~oodtune.metrics.pixel.PixelDetectionCounter` with the void pixels left out; so
memory does not grow with the number of pixels, except for the SegmentMeIfYouCan component metrics, which keep
each frame's score map as float16 (2 bytes per pixel) until the threshold is known (``components=False`` skips
them). The report's ``scores`` keep a seeded sample of pixel scores per set (``sample`` inlier and ``sample``
anomaly pixels, spread evenly over the frames) for histograms, ROC plots and frame-level bootstraps: its
``sample_frames`` say how many of the sampled inlier / anomaly pixels each frame gave, in frame order (the same
frames give the same pixel positions to every checkpoint, so two checkpoints' samples are paired).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.segmentation import ANOMALY, VOID, SegmentationSet
from ..data.tensors import Normalizer
from ..errors import DataError, DivergenceError
from ..functional import channel_argmax, gaussian_blur
from ..metrics.ood import DEFAULT_POSITIVE, Positive
from ..metrics.pixel import ConfusionCounter, PixelDetectionCounter, component_metrics
from ..models import SegmentationModel
from ..scores import Score, score_map
from ..utils.progress import format_rate, progress_bar
from ..utils.runtime import autocast, current_inference_precision, prepare_inference, resolve_device, resolve_precision
from .classification import METRIC_KEYS, EvalReport

__all__ = ["evaluate_segmentation", "forward_maps", "segmentation_metrics"]

log = logging.getLogger(__name__)

#: SegmentMeIfYouCan's anomaly-track component size limits (pixels at 2048x1024), scaled to the evaluated size.
SMIYC_MIN_GT, SMIYC_MIN_PRED, SMIYC_PIXELS = 100, 500, 2048 * 1024


@torch.no_grad()
def forward_maps(net: SegmentationModel, data: SegmentationSet, normalizer: Normalizer, *,
                 device: str | torch.device | None = None, batch_size: int = 8, precision: str | None = None
                 ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(logits (b, C, H, W) float32 on the device, label maps (b, H, W) uint8) for each batch of ``data``.

    ``precision`` as in :func:`oodtune.evaluation.compute_outputs` (None: the enclosing
    :func:`oodtune.utils.runtime.inference_precision` block's, else fp32)."""
    dev = resolve_device(device if isinstance(device, str) or device is None else str(device))
    net, precision, channels_last = prepare_inference(net, dev, precision)
    with progress_bar(f"forward {data.name}", total=len(data)) as bar:
        t0 = time.perf_counter()
        for start in range(0, len(data), batch_size):
            frames = torch.from_numpy(data.images[start : start + batch_size]).permute(0, 3, 1, 2).to(dev)
            x = normalizer(frames)
            with autocast(dev, precision):
                logits = net(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()
            if not torch.isfinite(logits).all():
                raise DivergenceError(f"the model produced NaN/inf logits on {data.name}; the checkpoint may be "
                                      "diverged.")
            yield logits, data.labels[start : start + batch_size]
            bar.advance(len(frames))
            bar.update(rate=format_rate(start + len(frames), time.perf_counter() - t0))


def segmentation_metrics(net: SegmentationModel, normalizer: Normalizer, data: SegmentationSet, *,
                         device: str | None = None, batch_size: int = 8) -> dict[str, float]:
    """mIoU and pixel accuracy (%) of ``net`` on the ID set ``data``, void labels ignored
    (:class:`~oodtune.metrics.pixel.ConfusionCounter`), under both protocols of a network with more outputs than
    classes (ESPNet-CamVid: 12 outputs, 11 classes + void): ``miou`` / ``pixel_accuracy`` take the argmax over
    every output channel (a pixel predicted as an extra channel is wrong for every class), ``miou_classes`` /
    ``pixel_accuracy_classes`` the argmax over the class channels only. Equal when there are no extra outputs."""
    if data.num_classes != net.num_classes:
        raise DataError(f"{data.name} has {data.num_classes} classes but the model {net.num_classes}.")
    if data.ignore_index is not None and not (data.labels != data.ignore_index).any():
        raise DataError(f"{data.name}: no labelled pixel -- every pixel of its {len(data)} label map(s) is void "
                        f"({data.ignore_index}), so mIoU and pixel accuracy are undefined; check that the label maps "
                        "are this dataset's (class ids, not colour images) and not blank.")
    every = ConfusionCounter(net.num_classes, net.num_outputs, data.ignore_index)
    classes = ConfusionCounter(net.num_classes, net.num_classes, data.ignore_index)
    for logits, labels in forward_maps(net, data, normalizer, device=device, batch_size=batch_size):
        every.update(channel_argmax(logits).cpu().numpy(), labels)
        classes.update(channel_argmax(logits[:, : net.num_classes]).cpu().numpy(), labels)
    return {"miou": 100 * every.miou(), "pixel_accuracy": 100 * every.pixel_accuracy(),
            "miou_classes": 100 * classes.miou(), "pixel_accuracy_classes": 100 * classes.pixel_accuracy()}


class _SetScorer:
    """Everything one (score, anomaly set) pair accumulates."""

    def __init__(self, frames: int, sample: int, seed: int, components: bool, exact: bool) -> None:
        self.counter = PixelDetectionCounter(exact=exact)
        self.rng = np.random.default_rng(seed)
        self.per_frame = max(1, math.ceil(sample / max(frames, 1)))
        self.sample_in: list[np.ndarray] = []
        self.sample_out: list[np.ndarray] = []
        self.frames: dict[str, list[int]] = {"in": [], "out": []}  # sampled pixels per frame
        self.maps: list[tuple[np.ndarray, np.ndarray]] | None = [] if components else None

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        valid = labels != VOID
        anomaly = labels == ANOMALY
        self.counter.update(scores, anomaly, valid)
        for i in range(len(scores)):
            for key, want, out in (("in", valid[i] & ~anomaly[i], self.sample_in),
                                   ("out", anomaly[i], self.sample_out)):
                vals = scores[i][want]
                self.frames[key].append(min(self.per_frame, vals.size))
                if vals.size:
                    out.append(self.rng.choice(vals, size=min(self.per_frame, vals.size), replace=False))
            if self.maps is not None:
                self.maps.append((scores[i].astype(np.float16), labels[i]))


def evaluate_segmentation(net: SegmentationModel, normalizer: Normalizer, id_test: SegmentationSet,
                          anomaly_sets: Mapping[str, SegmentationSet], scores: Sequence[Score], *,
                          device: str | None = None, batch_size: int = 8, positive: Positive | None = None,
                          blur: bool = False, components: bool = True, sample: int = 20000,
                          seed: int = 0, id_metrics: bool = True, exact: bool = False,
                          also_blurred: bool = False) -> EvalReport:
    """mIoU / pixel accuracy on ``id_test`` plus, per score and anomaly set, AUROC / AUPR-In / AUPR-Out (= AP) /
    FPR95 over all non-void pixels (``fpr95``: anomaly pixels positive by default; ``fpr95_in``: inlier pixels
    positive — the % of anomaly pixels accepted at the threshold accepting 95 % of inliers), the AUROC and AP error
    bounds of the streaming counts, and the SegmentMeIfYouCan sIoU / PPV / mean F1 (all in %); see the module
    docstring. ``id_metrics=False`` skips the mIoU pass over ``id_test`` (the report's ``id_metrics`` are then
    empty). ``exact=True`` counts every distinct float32 score (both bounds 0, memory growing with the distinct
    scores: :class:`~oodtune.metrics.pixel.PixelDetectionCounter`). ``also_blurred`` (with ``blur`` False) also
    measures the blurred score maps from the same forward passes: the report's ``blurred`` is their report (the
    same ID metrics and pixel-sample positions)."""
    if not anomaly_sets:
        raise DataError("no anomaly sets given; name at least one (e.g. --ood road-anomaly).")
    for name, ds in anomaly_sets.items():
        if not ds.is_anomaly_set:
            raise DataError(f"{name} is not an anomaly set (labels 0 = in-distribution, 1 = anomaly, 255 = void).")
    t0 = time.perf_counter()
    if id_metrics:
        log.info("ID metrics: mIoU on the %d %s frames first (skip with --no-id-metrics when only the anomaly "
                 "metrics are wanted)", len(id_test), id_test.name)
    id_values = segmentation_metrics(net, normalizer, id_test, device=device, batch_size=batch_size) \
        if id_metrics else {}
    precision = resolve_precision(resolve_device(device), current_inference_precision())
    variants = (False, True) if also_blurred and not blur else (blur,)
    reports = {v: EvalReport(id_metrics=dict(id_values), precision=precision) for v in variants}
    pos: Positive = positive or DEFAULT_POSITIVE
    pooled_in: dict[tuple[bool, str], list[np.ndarray]] = {(v, s.name): [] for v in variants for s in scores}
    for name, ds in anomaly_sets.items():
        scorers = {(v, s.name): _SetScorer(len(ds), sample, seed, components, exact) for v in variants for s in scores}
        for logits, labels in forward_maps(net, ds, normalizer, device=device, batch_size=batch_size):
            for s in scores:
                smap = score_map(s, logits, net.num_classes)
                for v in variants:
                    scorers[(v, s.name)].add((gaussian_blur(smap) if v else smap).cpu().numpy(), labels)
        for (v, score), sc in scorers.items():
            _add_set(reports[v], sc, score, name, ds, pos)
            pooled_in[(v, score)] += sc.sample_in
    for (v, score), pooled in pooled_in.items():
        reports[v].scores[score]["id"] = np.concatenate(pooled) if pooled else np.zeros(0, np.float32)
    report = reports[variants[0]]
    if len(variants) == 2:
        report.blurred = reports[True]
    report.seconds = time.perf_counter() - t0
    return report


def _add_set(report: EvalReport, sc: _SetScorer, score: str, name: str, ds: SegmentationSet, pos: Positive) -> None:
    """The metrics row, pixel samples and per-frame sample counts of one (score, anomaly set) into ``report``."""
    res = sc.counter.result(positive=pos)
    row: dict[str, float | str] = {"score": score, "dataset": name,
                                   **{k: v for k, v in res.metrics.as_percent().items() if k in METRIC_KEYS},
                                   "fpr95_in": 100 * sc.counter.result(positive="in").metrics.fpr95,
                                   "auroc_bound": 100 * res.auroc_bound, "ap_bound": 100 * res.ap_bound,
                                   "anomaly_pixels": 100 * res.n_anomaly / (res.n_anomaly + res.n_inlier),
                                   "n_ood": len(ds)}  # frames of the anomaly set
    if sc.maps is not None:
        h, w = ds.size[1], ds.size[0]
        scale = h * w / SMIYC_PIXELS
        comp = component_metrics(sc.maps, res.best_f1_threshold, min_gt_size=max(1, round(SMIYC_MIN_GT * scale)),
                                 min_pred_size=max(1, round(SMIYC_MIN_PRED * scale)))
        row.update({"siou": 100 * comp.siou, "ppv": 100 * comp.ppv, "mean_f1": 100 * comp.mean_f1})
    report.rows.append(row)
    report.scores.setdefault(score, {})[name] = np.concatenate(sc.sample_out) if sc.sample_out \
        else np.zeros(0, np.float32)
    report.sample_frames.setdefault(score, {})[name] = sc.frames
    report.sample_inliers.setdefault(score, {})[name] = np.concatenate(sc.sample_in) if sc.sample_in \
        else np.zeros(0, np.float32)
