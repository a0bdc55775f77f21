"""Semantic segmentation: pixel-wise OOD detection (anomaly segmentation) as in PEBAL (Tian et al., ECCV 2022) and
the Balanced Energy paper's segmentation tables (Choi et al., CVPR 2023).

A segmentation checkpoint enters with :func:`import_segmenter` (the published ESPNets, or any ``nn.Module`` that
returns B×C×H×W logits); the generic steps then work on it: ``estimate_prior`` (P(y|o) = the pretrained model's
argmax histogram over pasted-object pixels), ``propose_margins`` (from pixel energies), ``finetune`` (the
checkpoint's ``trainable`` block, or the part ``TrainConfig.train_part`` names; objects of the ``train`` bank pasted
into ID *train* frames), ``evaluate`` (mIoU on the ID test split; pixel AUROC / AP / FPR95 on anomaly sets). Anomaly
sets are evaluated at the model's input height with their own aspect ratio (Road Anomaly 1280x720 -> 640x360 for a
480x360 CamVid model).

Fine-tuning defaults (:data:`SEGMENTATION_FINETUNE`): PEBAL's recipe where it transfers — Adam, lr 1e-5 with poly
decay (1 − t/T)^0.9, batch 8, 40 epochs over the ID train split — with one frame of every 8 carrying a pasted object
(PEBAL: about 1 in 11).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import SegmentationSet, is_segmentation_set
from ..data.objects import paste_objects
from ..data.segmentation import Size
from ..errors import CheckpointError, ConfigError, ModelError
from ..evaluation.classification import EvalReport
from ..evaluation.segmentation import evaluate_segmentation, forward_maps, segmentation_metrics
from ..functional import channel_argmax, energy
from ..losses.pixel import OUTLIER_LABEL, build_pixel_loss, needs_abstention
from ..losses.terms import CompositeLoss
from ..metrics.ood import Positive
from ..models import (
    ESPNET_ARCHS,
    ESPNET_PREPROCESSING,
    RunMeta,
    SegmentationModel,
    build_model,
    read_state_dict,
    resolve_train_part,
    save_checkpoint,
    weights_hash,
)
from ..scores import PIXEL_SCORE_NAMES, Score, build_score, score_map
from ..training.config import SEGMENTATION_FINETUNE, TrainConfig
from ..training.segmentation import SegmentationTrainer
from ..training.trainer import FINAL
from .source import DataSource, as_source
from .task import Task, ValidationSpec, normalizer_for, register_task

__all__ = ["SEGMENTATION_FINETUNE", "SegmentationEvaluation", "SegmentationTask", "anomaly_examples", "id_test_miou",
           "import_segmenter"]

#: ImageNet statistics: the normalisation of a user segmenter when none is given.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The last decoder block of the built-in ESPNets: the 3x3 fusion CBR and the final 2x transposed convolution.
ESPNET_TRAINABLE = ("conv", "classifier")
#: Pixels kept per frame when the pretrained model's pixel energies are collected (margins).
ENERGY_PIXELS_PER_FRAME = 2000
PRIOR_SEED = 0
#: ID train frames (seeded sample) whose pixel energies propose or check margins.
MARGIN_FRAMES = 100
log = logging.getLogger(__name__)


def _input_size(meta: RunMeta) -> Size:
    if meta.input_size is None:
        raise CheckpointError("a segmentation checkpoint must record its input_size; re-import the model.")
    return meta.input_size[0], meta.input_size[1]


def _id_set(meta: RunMeta, source: DataSource, split: str) -> SegmentationSet:
    return source.segmentation(meta.dataset, split, size=_input_size(meta))


def _pasted_train_pass(net: SegmentationModel, meta: RunMeta, outliers: str, source: DataSource,
                       device: str | None, frames: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of the pretrained ``net`` over the ID train frames (``frames``: the first of a seeded shuffle;
    None: all), each with one ``train`` object pasted (seeded): (argmax counts over the K classes on pasted pixels,
    energies of a seeded sample of labelled ID pixels, energies of every pasted pixel). Memoised per network,
    outlier bank and frame count."""
    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        train = _id_set(meta, source, "train")
        if frames is not None and frames < len(train):
            keep = np.sort(np.random.default_rng(PRIOR_SEED).choice(len(train), size=frames, replace=False))
            log.info("energies of the pretrained model on %d of %d ID train frames with pasted objects (seeded "
                     "sample)", frames, len(train))
            train = train.subset(keep)
        bank = source.objects(outliers, "train")
        rng = np.random.default_rng(PRIOR_SEED)
        images, labels = train.images.copy(), train.labels.copy()
        paste_objects(images, labels, bank, rng, OUTLIER_LABEL)
        pasted = SegmentationSet(images, labels, train.classes, train.ignore_index, f"{train.name}+{bank.name}")
        counts = torch.zeros(meta.num_classes, dtype=torch.int64)
        e_in, e_out = [], []
        for logits, lab in forward_maps(net, pasted, normalizer_for(meta), device=device):
            lab_t = torch.from_numpy(lab).to(logits.device)
            outlier = lab_t == OUTLIER_LABEL
            pred = channel_argmax(logits[:, : meta.num_classes])[outlier]
            counts += torch.bincount(pred.cpu(), minlength=meta.num_classes)
            e = energy(logits[:, : meta.num_classes]).cpu()
            e_out.append(e[outlier.cpu()])
            labelled = (~outlier & (lab_t != (-1 if meta.ignore_index is None else meta.ignore_index))).cpu()
            for i in range(len(e)):
                vals = e[i][labelled[i]].numpy()
                keep = rng.choice(vals.size, size=min(ENERGY_PIXELS_PER_FRAME, vals.size), replace=False)
                e_in.append(torch.from_numpy(vals[keep]))
        return counts, torch.cat(e_in), torch.cat(e_out)

    return source.memo(("pasted-train-pass", weights_hash(net), meta.dataset, meta.input_size, outliers, frames),
                       run)


@dataclass(frozen=True)
class SegmentationEvaluation:
    """The segmentation task's evaluation options: ``blur`` Gaussian-blurs the per-pixel score maps (kernel 7, σ 1)
    before the metrics, as PEBAL's test code can; ``id_metrics=False`` skips the mIoU pass over the ID test frames;
    ``exact`` keys the pixel counts by the full float32 score, so AUROC, AP and FPR95 are exact (bounds 0)."""

    blur: bool = False
    id_metrics: bool = True  # False: no mIoU pass over the ID test frames
    also_blurred: bool = False  # True (blur False): the blurred maps' report too, from the same forward passes
    exact: bool = False  # True: full float32 keys in the pixel counts (PixelDetectionCounter(exact=True))


class SegmentationTask(Task[SegmentationModel, SegmentationEvaluation]):
    """Frames in, per-pixel logits out; scores and metrics per pixel (see the module docstring)."""

    name = "segmentation"
    finetune_defaults = SEGMENTATION_FINETUNE
    default_outliers = "coco-objects"

    def wrap(self, model: nn.Module, meta: RunMeta) -> SegmentationModel:
        return SegmentationModel(model, meta.num_classes, meta.extra_channels, meta.trainable)

    def build_loss(self, method: str, meta: RunMeta, prior_gamma: torch.Tensor | None,
                   options: Mapping[str, Any]) -> CompositeLoss:
        if needs_abstention(method) and meta.extra_channels < 1:
            raise ConfigError(f"method {method!r} (PEBAL's Gambler loss) needs an abstention output after the "
                              f"{meta.num_classes} class logits, but this model has none; import it with "
                              "--extra-channels 1 (one more output channel), or use energy-oe / balanced-energy.")
        return build_pixel_loss(method, num_classes=meta.num_classes, ignore_index=meta.ignore_index,
                                prior_gamma=prior_gamma, **options)

    def train_set(self, meta: RunMeta, source: DataSource) -> SegmentationSet:
        return _id_set(meta, source, "train")

    def fresh_model(self, meta: RunMeta, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(meta.arch, meta.num_classes + meta.extra_channels)

    def prior_counts(self, net: SegmentationModel, meta: RunMeta, outliers: str, source: DataSource,
                     device: str | None) -> torch.Tensor:
        return _pasted_train_pass(net, meta, outliers, source, device)[0]

    def energies(self, net: SegmentationModel, meta: RunMeta, outliers: str, source: DataSource,
                 device: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        _, e_in, e_out = _pasted_train_pass(net, meta, outliers, source, device, MARGIN_FRAMES)
        return e_in, e_out

    def train(self, net: SegmentationModel, meta: RunMeta, loss: CompositeLoss, config: TrainConfig, *,
              outliers: str | None, source: DataSource, run_dir: Path) -> Path:
        bank = source.objects(outliers, "train") if outliers else None
        part = resolve_train_part(net.model, meta.arch, config.train_part, meta.trainable)
        if part != meta.trainable:  # the checkpoint records the modules this run trained
            net.set_trainable(part)
            meta = meta.replace(trainable=part)
        SegmentationTrainer(net, self.train_set(meta, source), loss, config, outliers=bank,
                            normalizer=normalizer_for(meta), run_dir=run_dir, meta=meta).fit()
        return Path(run_dir) / FINAL

    def build_scores(self, meta: RunMeta, names: Sequence[str]) -> list[Score]:
        """The named per-pixel scores; only those of ``PIXEL_SCORE_NAMES`` apply to segmentation."""
        unknown = [s for s in names if s not in PIXEL_SCORE_NAMES]
        if unknown:
            raise ConfigError(f"score(s) {unknown} do not apply to segmentation; choose from "
                              f"{', '.join(PIXEL_SCORE_NAMES)}.")
        return [build_score(s) for s in names]

    def evaluation_options(self, *, blur: bool = False,
                           validation: ValidationSpec | None = None,
                           id_metrics: bool = True, exact: bool = False,
                           also_blurred: bool = False) -> SegmentationEvaluation:
        if validation is not None:
            raise ConfigError("choosing score hyperparameters on a validation pair (--select-on) is implemented for "
                              "classification checkpoints only; segmentation scores keep their papers' values. "
                              "Evaluate without it (drop --select-on).")
        return SegmentationEvaluation(blur=blur, id_metrics=id_metrics, exact=exact, also_blurred=also_blurred)

    def evaluate(self, net: SegmentationModel, meta: RunMeta, scores: Sequence[str], ood: Sequence[str], *,
                 source: DataSource, device: str | None, num_ood: int | None, batch_size: int,
                 positive: Positive | None, options: SegmentationEvaluation,
                 id_split: str = "test") -> EvalReport:
        built = self.build_scores(meta, scores)
        height = _input_size(meta)[1]
        sets = {name: source.segmentation(name, "test", height=height, num_images=num_ood) for name in ood}
        return evaluate_segmentation(net, normalizer_for(meta), _id_set(meta, source, id_split), sets,
                                     built, device=device, batch_size=min(batch_size, 8), positive=positive,
                                     blur=options.blur, id_metrics=options.id_metrics, exact=options.exact,
                                     also_blurred=options.also_blurred)


register_task(SegmentationTask())


def import_segmenter(weights: str | Path, out: str | Path, *, arch: str, dataset: str = "camvid",
                     data_root: DataSource | str | Path | None = None, input_size: Size | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     channel_order: str | None = None, extra_channels: int | None = None,
                     trainable: Sequence[str] | None = None) -> Path:
    """Turn a segmentation network trained elsewhere into an oodtune checkpoint at ``out``.

    ``arch`` rebuilds it (``espnet`` / ``espnet-camvid``, or ``package.module:factory`` whose factory takes
    ``num_classes`` = its output channels), ``weights`` is its state_dict (loaded strictly, ``weights_only``),
    ``dataset`` the ID segmentation set whose K classes its first K outputs are; ``extra_channels`` outputs follow
    (default: read from the ESPNet weights, else 0; PEBAL uses the last as abstention channel). ``input_size`` =
    (width, height) it is fed at (default: the data set's native size); ``mean``/``std`` on [0, 1] pixels and
    ``channel_order`` (default: the published ESPNet preprocessing, BGR; ImageNet's RGB statistics for other
    models); ``trainable`` the modules fine-tuning may train (ESPNet: its last decoder block; default otherwise:
    all).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing is overwritten).")
    if not is_segmentation_set(dataset):
        raise ConfigError(f"{dataset!r} is not a segmentation data set; see `oodtune datasets` ([segmentation]).")
    source = as_source(data_root)
    train = source.segmentation(dataset, "train", size=input_size)
    if train.is_anomaly_set:
        raise ConfigError(f"{dataset} is an anomaly test set; import the model with the ID data set it was "
                          "trained on (e.g. camvid).")
    k, size = train.num_classes, train.size
    if size[0] % 8 or size[1] % 8:
        raise ConfigError(f"input size {size[0]}x{size[1]} must be divisible by 8; pass --input-size.")
    state = read_state_dict(weights)
    espnet = arch in ESPNET_ARCHS
    if extra_channels is None:
        extra_channels = int(state["classifier.weight"].shape[1]) - k if espnet and "classifier.weight" in state else 0
    if extra_channels < 0:
        raise ModelError(f"{weights} has fewer outputs than the {k} classes of {dataset}; import it with the data "
                         "set it was trained on.")
    model = build_model(arch, k + extra_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit --arch {arch} with {k} classes ({dataset}) + "
                              f"{extra_channels} extra outputs: {exc}") from exc
    preset = ESPNET_PREPROCESSING.get(arch)
    meta = RunMeta(
        arch=arch, num_classes=k, classes=train.classes, task="segmentation", stage="imported", dataset=dataset,
        mean=tuple(mean or (preset["mean"] if preset else IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(std or (preset["std"] if preset else IMAGENET_STD)),  # type: ignore[arg-type]
        resolution=size[1], input_size=size, channel_order=channel_order or ("bgr" if espnet else "rgb"),
        extra_channels=extra_channels, ignore_index=train.ignore_index,
        trainable=tuple(trainable if trainable is not None else (ESPNET_TRAINABLE if espnet else ())),
        class_counts=tuple(int(c) for c in train.class_pixel_counts()), weights=str(weights))
    net = SegmentationTask().wrap(model, meta).eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, size[1], size[0]))  # raises ModelError naming the fix when the outputs do not fit
    return save_checkpoint(out, net, meta)


def id_test_miou(checkpoint: str | Path, *, data_root: DataSource | str | Path | None = None,
                 device: str | None = None) -> dict[str, float]:
    """mIoU and pixel accuracy (%) of a segmentation checkpoint on the test split of its ID data set."""
    from . import load_task_model

    net, meta, _ = load_task_model(checkpoint)
    if meta.task != "segmentation":
        raise ConfigError(f"{checkpoint} is a {meta.task} checkpoint, not a segmentation one.")
    return segmentation_metrics(net, normalizer_for(meta), _id_set(meta, as_source(data_root), "test"),
                                device=device)


def anomaly_examples(checkpoint: str | Path, dataset: str, count: int = 4, *,
                     data_root: DataSource | str | Path | None = None, device: str | None = None,
                     score: str = "energy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (n, H, W, 3), labels (n, H, W), per-pixel ``score`` maps, higher = more in-distribution (n, H, W))
    of ``count`` frames spread evenly over the anomaly set ``dataset`` (its first and last included), under
    ``checkpoint`` (for the anomaly-map figures)."""
    from . import load_task_model

    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    net, meta, _ = load_task_model(checkpoint)
    data = as_source(data_root).segmentation(dataset, "test", height=_input_size(meta)[1])
    subset = data.subset(np.unique(np.linspace(0, len(data) - 1, count).round().astype(int)))
    fn = build_score(score)
    maps = [score_map(fn, logits, meta.num_classes).cpu().numpy()
            for logits, _ in forward_maps(net, subset, normalizer_for(meta), device=device)]
    return subset.images, subset.labels, np.concatenate(maps)
