"""Score ID and OOD sets with a trained classifier and measure detection the way the field does.

Output-based scores (every score but ODIN) share one forward pass per dataset: logits and features are computed
once and every score reads them; ODIN, which perturbs its inputs, runs its own. Scores that need ID statistics
are ``fit`` on the ID *train* split only; scores that need the final layer get it from the network. With a
:class:`Validation` pair, each score's hyperparameters are first chosen on never-trained-on ID images vs held-out
auxiliary outliers (:mod:`oodtune.scores.selection`). All metrics treat scores as "higher = more
in-distribution".
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..data.streaming import DeviceImages
from ..data.tensors import Normalizer
from ..errors import DataError, DivergenceError
from ..metrics import accuracy, detection_metrics
from ..metrics.ood import DEFAULT_POSITIVE, Positive
from ..models import FeatureModel
from ..scores import Score
from ..scores.selection import select_hyperparameters
from ..utils.progress import Bar, format_rate, progress_bar
from ..utils.runtime import autocast, current_inference_precision, prepare_inference, resolve_device, resolve_precision

__all__ = [
    "MAX_RATIO", "METRIC_KEYS", "MIN_OOD", "EvalReport", "Outputs", "Validation", "base_rate_warnings",
    "compute_outputs", "evaluate", "score_dataset",
]

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """Logits (N, K) and penultimate features (N, D) of a dataset, float32 on the scoring device."""

    logits: torch.Tensor
    features: torch.Tensor


def _check_resolution(ds: ImageSet, resolution: int) -> None:
    if ds.resolution != resolution:
        raise DataError(f"{ds.name} is {ds.resolution}px but the model expects {resolution}px; load it with "
                        f"resolution={resolution}.")


@torch.no_grad()
def compute_outputs(net: FeatureModel, ds: ImageSet, normalizer: Normalizer, *,
                    device: torch.device | str | None = None, batch_size: int = 1024,
                    precision: str | None = None, show_progress: bool = True) -> Outputs:
    """Run ``net`` (eval mode) over ``ds`` in batches; logits/features come back as float32 on ``device``.

    ``precision`` None: that of the enclosing :func:`oodtune.utils.runtime.inference_precision` block, fp32 outside one.
    Under bf16 the network runs channels_last with bf16 autocast and its classification layer in fp32
    (:class:`~oodtune.models.FeatureModel`), so logits keep fp32 resolution; scores and metrics are computed from
    them in fp32/fp64. ``show_progress=False`` for callers that report progress over many calls themselves. A set
    on disk is read a batch at a time, the next batch read while the current one runs (:mod:`oodtune.data.streaming`).
    """
    dev = resolve_device(device if isinstance(device, str) or device is None else str(device))
    net, precision, channels_last = prepare_inference(net, dev, precision)
    logits, feats = [], []
    with progress_bar(f"forward {ds.name}", total=len(ds)) if show_progress else nullcontext(Bar()) as bar:
        t0, done = time.perf_counter(), 0
        for images in DeviceImages(ds.images, dev, ds.name).batches(batch_size):
            x = normalizer(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, precision):
                lo, fe = net(x)
            logits.append(lo.float())
            feats.append(fe.float())
            done += len(x)
            bar.advance(len(x))
            bar.update(rate=format_rate(done, time.perf_counter() - t0))
    out = Outputs(torch.cat(logits), torch.cat(feats))
    if not torch.isfinite(out.logits).all():
        raise DivergenceError(f"the model produced NaN/inf logits on {ds.name}; the checkpoint may be diverged.")
    return out


def score_dataset(score: Score, net: FeatureModel, ds: ImageSet, outputs: Outputs, normalizer: Normalizer,
                  *, batch_size: int = 512, show_progress: bool = True) -> np.ndarray:
    """Scores (higher = more ID) of every image in ``ds``; input-gradient scores re-run the network."""
    if not score.needs_input_grad:
        return score.from_outputs(outputs.logits, outputs.features).float().cpu().numpy()
    parts = []
    with progress_bar(f"{score.name} {ds.name}", total=len(ds)) if show_progress else nullcontext(Bar()) as bar:
        for images in DeviceImages(ds.images, outputs.logits.device, ds.name).batches(batch_size):
            parts.append(score.score_inputs(net, normalizer(images)).float().cpu())
            bar.advance(len(images))
    return torch.cat(parts).numpy()


@dataclass
class EvalReport:
    """ID-task metrics on the ID test set and one metrics row per (score, OOD set).

    ``id_metrics`` are percentages keyed by name (``accuracy`` for classification; a task may add more, e.g.
    long-tailed head/medium/tail accuracy). ``scores`` holds the raw per-sample scores (higher = more ID).
    """

    id_metrics: dict[str, float]
    id_logits: torch.Tensor | None = None  # (N, K) float32 CPU logits of the ID test set
    rows: list[dict[str, float | str]] = field(default_factory=list)  # fpr95: ``positive``'s convention; fpr95_in: ID+
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # score -> dataset -> raw scores
    seconds: float = 0.0  # wall time of the evaluation
    positive: str = DEFAULT_POSITIVE  # the positive class of the rows' FPR95 ("out": OOD, "in": ID)
    precision: str = "fp32"  # what the forward passes ran in (fp32 / bf16 autocast)
    #: score -> its hyperparameter selection record (oodtune.scores.selection.Selection.to_dict), when selected
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: with selection: the rows of every score at its paper-default setting, from the same forward passes
    default_rows: list[dict[str, float | str]] = field(default_factory=list)
    #: segmentation: score -> anomaly set -> {"in": [...], "out": [...]}, the sampled inlier / anomaly pixels each
    #: frame gave to ``scores`` (frame order; the "id" scores pool the sets' inlier samples in set order)
    sample_frames: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)
    #: segmentation: score -> anomaly set -> the sample of that set's inlier-pixel scores (``scores[...]["id"]``
    #: pools these over the sets)
    sample_inliers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: segmentation with ``also_blurred``: the report of the blurred score maps, from the same forward passes
    blurred: EvalReport | None = None

    def averages(self, groups: Mapping[str, str] | None = None) -> list[dict[str, float | str]]:
        """Mean of each metric per score over all OOD sets, and per group (e.g. near/far) when given."""
        groups = groups or {}
        out = []
        for score in dict.fromkeys(r["score"] for r in self.rows):
            mine = [r for r in self.rows if r["score"] == score]
            buckets = {"average": mine}
            for g in sorted(set(groups.values())):
                buckets[f"average ({g})"] = [r for r in mine if groups.get(str(r["dataset"])) == g]
            for label, rows in buckets.items():
                if rows:
                    avg = {m: float(np.mean([r[m] for r in rows])) for m in METRIC_KEYS}
                    out.append({"score": score, "dataset": label, **avg})
        return out


METRIC_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")
#: Below this many OOD images, FPR95 moves in steps of more than 1 point and AUROC is noisy.
MIN_OOD = 100
#: OOD:ID size ratios beyond this (either way) make AUPR mostly a measure of the base rate.
MAX_RATIO = 10.0


def base_rate_warnings(n_id: int, n_ood: Mapping[str, int]) -> list[str]:
    """Warnings for OOD sets too small (< :data:`MIN_OOD`) or far larger/smaller than the ID test set."""
    out = []
    for name, n in n_ood.items():
        if n < MIN_OOD:
            out.append(f"OOD set {name} has only {n} images: FPR95 moves in steps of {100 / max(n, 1):.1f} points "
                       "and AUROC is noisy; use more images.")
        ratio = n / n_id
        if ratio > MAX_RATIO or ratio < 1 / MAX_RATIO:
            out.append(f"OOD set {name} has {n} images for {n_id} ID test images (ratio {ratio:.3g}): AUPR-In/Out "
                       "mostly reflect this base rate; subsample the larger side (--num-ood) for comparable numbers.")
    return out


@dataclass(frozen=True)
class Validation:
    """The validation pair of hyperparameter selection: ``id_images``, ID images the network was never trained on
    (the validation part held out before pretraining; :func:`oodtune.pipeline.id_unseen_set`), and held-out
    auxiliary ``outliers`` (never an OOD test set)."""

    id_images: ImageSet
    outliers: ImageSet


def _select(scores: Sequence[Score], net: FeatureModel, normalizer: Normalizer, train: Outputs, labels: torch.Tensor,
            validation: Validation, val_id: Outputs, outliers: Outputs) -> tuple[list[Score], dict[str, Any]]:
    """Each score replaced by its chosen grid setting on the validation pair (unfitted), and the selection records.
    Candidates are fitted on all of ID train: no validation image is a training image."""
    def validate(candidate: Score) -> tuple[np.ndarray, np.ndarray]:
        if candidate.needs_fit:
            candidate.fit(train.logits, train.features, labels)
        return (score_dataset(candidate, net, validation.id_images, val_id, normalizer),
                score_dataset(candidate, net, validation.outliers, outliers, normalizer))

    chosen, records = [], {}
    for s in scores:
        best, record = select_hyperparameters(s, train.features.shape[1], validate)
        chosen.append(best)
        records[s.name] = record.to_dict()
    return chosen, records


def evaluate(net: FeatureModel, normalizer: Normalizer, id_test: ImageSet, ood_sets: Mapping[str, ImageSet],
             scores: Sequence[Score], *, id_train: ImageSet | None = None, device: str | None = None,
             batch_size: int = 1024, positive: Positive | None = None,
             validation: Validation | None = None) -> EvalReport:
    """Accuracy on ``id_test`` plus AUROC/AUPR-In/AUPR-Out/FPR95 for every score x OOD set (in percent).

    Scores with ``needs_head`` get ``net``'s final layer; scores with ``needs_fit`` are fitted on the outputs of
    ``id_train`` (required for them). With ``validation`` (needs ``id_train``), each score's hyperparameters are first
    selected on the validation pair (module docstring; every candidate fitted on all of ``id_train``);
    ``report.selections`` records the search and ``report.default_rows`` holds the paper-default settings' rows, scored
    from the same outputs (no second forward pass). The scores passed in are not modified. ``positive`` overrides the
    metrics' positive-class convention (see ``oodtune.metrics``).
    """
    if not ood_sets:
        raise DataError("no OOD sets given; name at least one (e.g. --ood dtd --ood gaussian).")
    if id_test.labels is None:
        raise DataError(f"{id_test.name}: the ID test set needs labels to report accuracy.")
    t0 = time.perf_counter()
    resolution = id_test.resolution
    for ds in ood_sets.values():
        _check_resolution(ds, resolution)

    def outputs(ds: ImageSet) -> Outputs:
        return compute_outputs(net, ds, normalizer, device=device, batch_size=batch_size)

    id_out = outputs(id_test)
    acc = accuracy(id_out.logits.cpu(), torch.from_numpy(id_test.labels))
    report = EvalReport(id_metrics={"accuracy": 100 * acc}, id_logits=id_out.logits.cpu(),
                        positive=positive or DEFAULT_POSITIVE,
                        precision=resolve_precision(id_out.logits.device, current_inference_precision()))
    scores = [copy.deepcopy(s) for s in scores]  # the caller's objects are neither fitted nor changed
    for s in scores:
        if s.needs_head:
            s.use_head(*net.head_parameters())
    defaults: list[Score | None] = [None] * len(scores)  # with selection: the default where it was not chosen
    if any(s.needs_fit for s in scores) or validation is not None:
        if id_train is None or id_train.labels is None:
            needing = ", ".join(s.name for s in scores if s.needs_fit) or "hyperparameter selection"
            raise DataError(f"{needing} need(s) ID training statistics: pass the labelled ID train split "
                            "(id_train=...).")
        tr = outputs(id_train)
        labels = torch.from_numpy(id_train.labels).to(tr.logits.device)
        if validation is not None:
            _check_resolution(validation.id_images, resolution)
            chosen, report.selections = _select(scores, net, normalizer, tr, labels, validation,
                                                outputs(validation.id_images), outputs(validation.outliers))
            defaults = [d if report.selections[d.name]["chosen"] != report.selections[d.name]["default"] else None
                        for d in scores]
            scores = chosen
        for s in [*scores, *(d for d in defaults if d is not None)]:
            if s.needs_fit:
                s.fit(tr.logits, tr.features, labels)
    for warning in base_rate_warnings(len(id_test), {name: len(ds) for name, ds in ood_sets.items()}):
        log.warning(warning)
    ood_out = {name: outputs(ds) for name, ds in ood_sets.items()}

    def rows(s: Score) -> list[dict[str, float | str]]:
        id_scores = score_dataset(s, net, id_test, id_out, normalizer)
        report.scores[s.name] = {"id": id_scores}
        out: list[dict[str, float | str]] = []
        for name, ds in ood_sets.items():
            ood_scores = score_dataset(s, net, ds, ood_out[name], normalizer)
            report.scores[s.name][name] = ood_scores
            m = detection_metrics(id_scores, ood_scores)  # FPR95 under both conventions, one sort
            fpr = m["fpr95_in"] if positive == "in" else m["fpr95"]
            out.append({"score": s.name, "dataset": name, **m, "fpr95": fpr, "n_id": len(id_test),
                        "n_ood": len(ds)})
        return out

    for s, default in zip(scores, defaults, strict=True):
        default_rows = [] if default is None else rows(default)
        selected = rows(s)  # scored after the default, so report.scores holds the reported setting
        report.rows += selected
        if validation is not None:
            report.default_rows += default_rows or selected
    report.seconds = time.perf_counter() - t0
    return report
