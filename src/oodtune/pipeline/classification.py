"""Image classification: the task of the OE / Energy / Balanced Energy / Sparsity CIFAR experiments.

A checkpoint records the ID data it was trained on (dataset name, long-tail ratio, seeded subsample), so later
steps rebuild exactly that *training* split. Fine-tuning can only ever see the ID **train** split:
:func:`id_train_set` is the single place that loads ID training data and it has no split argument (a public
implementation fine-tuned on the test split).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data import ImageSet
from ..data.longtail import make_longtailed
from ..data.registry import canonical_name
from ..data.tensors import CIFAR_MEAN, CIFAR_STD, Normalizer
from ..energy import energy
from ..errors import CheckpointError, ConfigError, ModelError
from ..evaluation import EvalReport, Validation, compute_outputs, evaluate
from ..losses import CompositeLoss, build_method_loss
from ..metrics import accuracy, long_tail_accuracy
from ..metrics.ood import Positive
from ..models import (
    DEFAULT_DROP_RATE,
    FeatureModel,
    RunMeta,
    build_model,
    load_feature_model,
    read_state_dict,
    save_checkpoint,
)
from ..models.imported import input_normalisation
from ..prior import count_outlier_predictions
from ..scores import build_score
from ..training.config import FINETUNE, PRETRAIN, TrainConfig
from ..training.trainer import FINAL, Trainer
from .source import DataSource, as_source
from .task import Task, ValidationSpec, register_task

__all__ = ["ClassificationTask", "fresh_model", "id_test_accuracy", "id_train_set", "import_model",
           "normalizer_for", "pretrain", "pretrain_setup"]


def _train_split(source: DataSource, dataset: str, resolution: int, imbalance_ratio: float | None,
                 num_train: int | None, data_seed: int) -> ImageSet:
    ds = source.load(dataset, "train", resolution)
    if imbalance_ratio:
        ds = make_longtailed(ds, float(imbalance_ratio), seed=data_seed)
    if num_train and num_train < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(data_seed))
        ds = ds.subset(idx[:num_train].numpy())
    return ds


def id_train_set(meta: RunMeta, data_root: DataSource | str | Path | None) -> ImageSet:
    """The ID training split recorded in ``meta`` (dataset, resolution, long-tail ratio, subsample)."""
    return _train_split(as_source(data_root), meta.dataset, meta.resolution, meta.imbalance_ratio, meta.num_train,
                        meta.data_seed)


def normalizer_for(meta: RunMeta) -> Normalizer:
    """The input normalisation a checkpoint was trained with."""
    return Normalizer(meta.mean, meta.std)


def fresh_model(arch: str, num_classes: int, *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0) -> nn.Module:
    """A newly initialised classifier whose weights depend only on ``seed``, not on RNG use before the call."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, drop_rate=drop_rate)


def pretrain_setup(*, dataset: str = "cifar10", arch: str = "wrn-40-2",
                   data_root: DataSource | str | Path | None = None, resolution: int = 32,
                   imbalance_ratio: float | None = None, num_train: int | None = None,
                   data_seed: int = 0, seed: int = 0, stage: str = "pretrain", mean: Sequence[float] = CIFAR_MEAN,
                   std: Sequence[float] = CIFAR_STD, head: str | None = None
                   ) -> tuple[RunMeta, ImageSet, FeatureModel]:
    """(checkpoint meta, ID training split, model freshly initialised from ``seed``) of a run from scratch.

    ``mean``/``std`` are the input normalisation, ``head`` the classification layer whose input is the feature
    vector (default: found automatically, see :class:`FeatureModel`)."""
    train = _train_split(as_source(data_root), dataset, resolution, imbalance_ratio, num_train, data_seed)
    meta = RunMeta(arch=arch, num_classes=train.num_classes, classes=train.classes, mean=tuple(mean),  # type: ignore[arg-type]
                   std=tuple(std), resolution=resolution, dataset=dataset, stage=stage, head=head,  # type: ignore[arg-type]
                   data_seed=data_seed, imbalance_ratio=imbalance_ratio, num_train=num_train,
                   class_counts=tuple(int(c) for c in train.class_counts()))
    model = fresh_model(arch, train.num_classes, drop_rate=meta.drop_rate, seed=seed)
    return meta, train, FeatureModel(model, head)


def pretrain(out: str | Path, *, dataset: str = "cifar10", arch: str = "wrn-40-2",
             data_root: DataSource | str | Path | None = None, config: TrainConfig | None = None,
             resolution: int = 32, imbalance_ratio: float | None = None, num_train: int | None = None,
             data_seed: int = 0, head: str | None = None) -> Path:
    """Standard cross-entropy training from scratch (:data:`~oodtune.training.config.PRETRAIN` recipe by
    default); returns the path of ``OUT/model.pt``."""
    config = config or PRETRAIN
    meta, train, net = pretrain_setup(dataset=dataset, arch=arch, data_root=data_root, resolution=resolution,
                                      imbalance_ratio=imbalance_ratio, num_train=num_train, data_seed=data_seed,
                                      seed=config.seed, head=head)
    Trainer(net, train, build_method_loss("ce"), config, normalizer=normalizer_for(meta), run_dir=out, meta=meta).fit()
    return Path(out) / FINAL


def import_model(weights: str | Path, out: str | Path, *, arch: str, dataset: str = "cifar10",
                 data_root: DataSource | str | Path | None = None, resolution: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 head: str | None = None) -> Path:
    """Turn a classifier trained elsewhere into an oodtune checkpoint at ``out``, so that estimate-prior,
    propose-margins, finetune, evaluate and benchmark work on it.

    ``arch`` rebuilds it (a built-in name or ``package.module:factory``), ``weights`` is its saved state_dict
    (see :func:`~oodtune.models.read_state_dict`), ``dataset`` the ID data it was trained on (its class count must
    match the model's), ``mean``/``std`` the normalisation it was trained with (on [0, 1] pixels; each defaults to
    the model's timm-style ``pretrained_cfg`` when it has one, else to CIFAR-10's), ``head`` the layer whose input
    is the feature vector.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing is overwritten).")
    meta, _, net = pretrain_setup(dataset=dataset, arch=arch, data_root=data_root, resolution=resolution,
                                  stage="imported", mean=mean or CIFAR_MEAN, std=std or CIFAR_STD, head=head)
    from_cfg = input_normalisation(net.model)
    if from_cfg is not None and (mean is None or std is None):
        meta = meta.replace(mean=tuple(mean or from_cfg[0]), std=tuple(std or from_cfg[1]))
    classes = meta.num_classes
    try:
        net.model.load_state_dict(read_state_dict(weights))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit --arch {arch} with {classes} classes ({dataset}): "
                              f"{exc}") from exc
    try:
        with torch.no_grad():
            logits, _ = net.eval()(torch.zeros(2, 3, resolution, resolution))
    except RuntimeError as exc:
        raise ModelError(f"--arch {arch} fails on a batch of {resolution}x{resolution} images: {exc} "
                         "(on the command line: --head NAME)") from exc
    if logits.shape != (2, classes) or net.num_classes != classes:
        raise ModelError(f"the model gives {tuple(logits.shape[1:])} logits per image from a head with "
                         f"{net.num_classes} outputs, but {dataset} has {classes} classes; use --head to name the "
                         "layer that produces the logits, or weights trained on this dataset.")
    return save_checkpoint(out, net, meta.replace(weights=str(weights)))


def id_test_accuracy(checkpoint: str | Path, *, data_root: DataSource | str | Path | None = None,
                     device: str | None = None) -> float:
    """Top-1 accuracy of ``checkpoint`` on the test split of its ID dataset (a sanity check after import)."""
    net, meta = load_feature_model(checkpoint)
    test = as_source(data_root).load(meta.dataset, "test", meta.resolution)
    logits = compute_outputs(net, test, normalizer_for(meta), device=device).logits
    return accuracy(logits.cpu(), test.labels)


class ClassificationTask(Task):
    """Images in, class logits out; scores and metrics per image (see the module docstring)."""

    name = "classification"
    finetune_defaults = FINETUNE

    def train_set(self, meta: RunMeta, source: DataSource) -> ImageSet:
        return id_train_set(meta, source)

    def fresh_model(self, meta: RunMeta, seed: int) -> nn.Module:
        return fresh_model(meta.arch, meta.num_classes, drop_rate=meta.drop_rate, seed=seed)

    def _logits(self, net: FeatureModel, meta: RunMeta, ds: ImageSet, device: str | None) -> torch.Tensor:
        return compute_outputs(net, ds, normalizer_for(meta), device=device).logits

    def prior_counts(self, net: FeatureModel, meta: RunMeta, outliers: str, source: DataSource,
                     device: str | None) -> torch.Tensor:
        logits = self._logits(net, meta, source.load(outliers, "train", meta.resolution), device)
        return count_outlier_predictions(lambda t: t, logits.split(1024), meta.num_classes)

    def energies(self, net: FeatureModel, meta: RunMeta, outliers: str, source: DataSource,
                 device: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        e_in = energy(self._logits(net, meta, self.train_set(meta, source), device)).cpu()
        e_out = energy(self._logits(net, meta, source.load(outliers, "train", meta.resolution), device)).cpu()
        return e_in, e_out

    def train(self, net: FeatureModel, meta: RunMeta, loss: CompositeLoss, config: TrainConfig, *,
              outliers: str | None, source: DataSource, run_dir: Path) -> Path:
        aux = source.load(outliers, "train", meta.resolution) if outliers else None
        Trainer(net, self.train_set(meta, source), loss, config, outliers=aux, normalizer=normalizer_for(meta),
                run_dir=run_dir, meta=meta).fit()
        return Path(run_dir) / FINAL

    def validation_pair(self, meta: RunMeta, id_train: ImageSet, spec: ValidationSpec, ood: Sequence[str],
                        source: DataSource) -> Validation:
        """The held-out ID train indices and outlier images of ``spec``; refuses an OOD test set as outliers."""
        if canonical_name(spec.outliers) in {canonical_name(o) for o in ood}:
            raise ConfigError(f"the validation outliers {spec.outliers!r} are also an OOD test set; choose held-out "
                              "auxiliary outliers (e.g. tin-aux-val), never a test set.")
        if not 1 <= spec.id_holdout < len(id_train):
            raise ConfigError(f"id_holdout must be between 1 and {len(id_train) - 1} (the ID train split has "
                              f"{len(id_train)} images), got {spec.id_holdout}.")
        perm = torch.randperm(len(id_train), generator=torch.Generator().manual_seed(spec.seed))
        outliers = source.load(spec.outliers, "test", meta.resolution, spec.num_outliers)
        return Validation(holdout=perm[: spec.id_holdout].numpy(), outliers=outliers)

    def evaluate(self, net: FeatureModel, meta: RunMeta, scores: Sequence[str], ood: Sequence[str], *,
                 source: DataSource, device: str | None, num_ood: int | None, batch_size: int,
                 positive: Positive | None, validation: ValidationSpec | None = None) -> EvalReport:
        built = [build_score(s) for s in scores]
        id_test = source.load(meta.dataset, "test", meta.resolution)
        needs_train = validation is not None or any(s.needs_fit for s in built)
        id_train = self.train_set(meta, source) if needs_train else None
        ood_sets = {name: source.load(name, "test", meta.resolution, num_ood) for name in ood}
        pair = None if validation is None or id_train is None else \
            self.validation_pair(meta, id_train, validation, ood, source)
        report = evaluate(net, normalizer_for(meta), id_test, ood_sets, built, id_train=id_train, device=device,
                          batch_size=batch_size, positive=positive, validation=pair)
        if meta.imbalance_ratio and report.id_logits is not None and id_test.labels is not None:
            report.id_metrics.update(long_tail_accuracy(report.id_logits, id_test.labels, meta.class_counts))
        return report


register_task(ClassificationTask())
