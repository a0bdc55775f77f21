"""Image classification: the task of the OE / Energy / Balanced Energy / Sparsity CIFAR experiments.

A checkpoint records the ID data it was trained on (dataset name, long-tail ratio, seeded subsample), so later
steps rebuild exactly that *training* split. Fine-tuning can only ever see the ID **train** split:
:func:`id_train_set` is the single place that loads ID training data and it has no split argument (a public
implementation fine-tuned on the test split). Every ID split loaded for a checkpoint must have the checkpoint's
class names in the same order (:func:`check_classes`): a renamed or added class folder would otherwise permute the
labels silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..data import ImageSet
from ..data.longtail import make_longtailed
from ..data.registry import canonical_name, has_test_split, resolve_dataset
from ..data.splits import TEST_STREAM, VAL_STREAM, holdout
from ..data.synthetic import GENERATORS
from ..data.tensors import CIFAR_MEAN, CIFAR_STD
from ..errors import CheckpointError, ConfigError, DataError, ModelError
from ..evaluation.classification import EvalReport, Validation, compute_outputs, evaluate
from ..functional import energy
from ..losses.prior import count_outlier_predictions
from ..losses.terms import CompositeLoss, build_method_loss
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
from ..scores import Score, build_score
from ..training.config import FINETUNE, PRETRAIN, TrainConfig
from ..training.trainer import FINAL, Trainer, check_run_dir
from ..utils.atomic import check_writable
from ..utils.lock import output_lock
from .source import DataSource, as_source
from .task import Task, ValidationSpec, normalizer_for, register_task

__all__ = ["DEFAULT_TEST_FRACTION", "ClassificationEvaluation", "ClassificationTask", "check_classes", "epoch_accuracy",
           "fresh_model", "id_parts", "id_test_accuracy", "id_test_set", "id_train_set", "import_model", "pretrain",
           "pretrain_setup"]

log = logging.getLogger(__name__)


def _id_dataset(meta: RunMeta) -> str:
    """``meta.dataset``, refused with the fix when it is a folder/archive path that no longer exists."""
    prefix, sep, path = meta.dataset.partition(":")
    if sep and prefix in ("folder", "images") and Path(path).is_absolute() and not Path(path).exists():
        raise DataError(f"the checkpoint's ID dataset {path} does not exist any more (moved or on another machine?); "
                        f"name its new place with --id-data {prefix}:NEW/PATH.")
    return meta.dataset


def check_classes(meta: RunMeta, data: ImageSet) -> ImageSet:
    """``data`` if its class names and their order are the checkpoint's, else a DataError naming the change."""
    want, got = tuple(meta.classes), tuple(data.classes)
    if not got or want == got:
        return data
    if len(want) != len(got):
        detail = (f"the checkpoint has {len(want)} classes, the data {len(got)} (missing: "
                  f"{[c for c in want if c not in got][:5]}, new: {[c for c in got if c not in want][:5]})")
    else:
        i = next(i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
        detail = f"class {i} is {want[i]!r} in the checkpoint but {got[i]!r} in the data"
    raise DataError(f"{data.name}: the classes are not those the checkpoint was trained on: {detail}. The labels "
                    "would silently mean other classes. Restore the dataset's classes (folder names and order), name "
                    "the dataset the model was trained on (--id-data), or train/import a model on the data as it is "
                    "now.")


def id_parts(meta: RunMeta, data_root: DataSource | str | Path | None) -> tuple[ImageSet, ImageSet | None,
                                                                                ImageSet | None]:
    """(train, validation, test) parts carved from the ID *train* split as ``meta`` records (before any long-tail
    or subsample); validation/test are None when nothing was carved for them."""
    source = as_source(data_root)
    base = check_classes(meta, source.load(_id_dataset(meta), "train", meta.resolution))
    if meta.source_size is not None and len(base) != meta.source_size:
        raise DataError(f"{meta.dataset} has {len(base)} training images but had {meta.source_size} when the model "
                        "was trained; its held-out parts would now differ from those it never saw. Restore the "
                        "dataset as it was, or name that copy with --id-data.")
    test = val = None
    if meta.test_fraction:
        base, test = holdout(base, meta.test_fraction, meta.data_seed, TEST_STREAM, f"{base.name}-heldout-test")
    if meta.val_fraction:
        base, val = holdout(base, meta.val_fraction, meta.data_seed, VAL_STREAM, f"{base.name}-heldout-val")
    return base, val, test


def id_train_set(meta: RunMeta, data_root: DataSource | str | Path | None) -> ImageSet:
    """The ID training split recorded in ``meta``: the train split minus its held-out parts, then the long-tail
    ratio and the seeded subsample."""
    return _training_subset(meta, id_parts(meta, data_root)[0])


def id_unseen_set(meta: RunMeta, data_root: DataSource | str | Path | None) -> ImageSet:
    """ID images the network was never trained on, for choosing hyperparameters: the validation part held out of
    the train split before pretraining (``val_fraction``, stratified like the test set), else — for a model trained
    on a long-tailed or smaller subsample — the images of the train pool outside its training subset (their class
    mix is then the pool's remainder, not the test set's). A DataError when every train image was trained on."""
    base, val, _ = id_parts(meta, data_root)
    if val is not None:
        return val
    # which pool images the subsample kept: the same steps on a carrier whose 1x1 "pixels" encode the index
    index = np.arange(len(base), dtype=np.int64)
    pixels = np.stack([(index >> shift) & 255 for shift in (16, 8, 0)], axis=1).astype(np.uint8)
    carrier = ImageSet(pixels.reshape(-1, 1, 1, 3), base.labels, base.classes, base.name)
    kept = np.asarray(_training_subset(meta, carrier).images).reshape(-1, 3).astype(np.int64)
    unseen = np.setdiff1d(index, (kept[:, 0] << 16) | (kept[:, 1] << 8) | kept[:, 2])
    if unseen.size == 0:
        raise DataError(f"{meta.dataset}: the model was trained on every ID train image, so none is left to choose "
                        "hyperparameters on. Pretrain with a validation part held out (--val-fraction 0.1, or "
                        "[pretrain] val_fraction in a benchmark), or on a subsample (--num-train).")
    return base.subset(unseen, name=f"{base.name}-unseen")


def _training_subset(meta: RunMeta, ds: ImageSet) -> ImageSet:
    """The long-tail ratio and the seeded subsample of ``meta`` applied to the train pool ``ds``."""
    if meta.imbalance_ratio:
        ds = make_longtailed(ds, float(meta.imbalance_ratio), seed=meta.data_seed)
    if meta.num_train and meta.num_train < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(meta.data_seed))
        ds = ds.subset(idx[:meta.num_train].numpy())
    return ds


def id_test_set(meta: RunMeta, data_root: DataSource | str | Path | None, split: str = "test") -> ImageSet:
    """A held-out ID set: ``test`` (the dataset's test split, or the part held out of a dataset without one), or
    ``val`` when choosing hyper-parameters (the validation part held out before pretraining, else the dataset's
    own val split)."""
    held = None
    if split == "test" and meta.test_fraction:
        held = id_parts(meta, data_root)[2]
    elif split == "val" and meta.val_fraction:
        held = id_parts(meta, data_root)[1]
    if held is not None:
        return held
    return check_classes(meta, as_source(data_root).load(_id_dataset(meta), split, meta.resolution))


def fresh_model(arch: str, num_classes: int, *, drop_rate: float = DEFAULT_DROP_RATE, seed: int = 0) -> nn.Module:
    """A newly initialised classifier whose weights depend only on ``seed``, not on RNG use before the call."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, drop_rate=drop_rate)


#: Test part held out of a ``folder:`` dataset without split folders (``pretrain --test-fraction``'s default).
DEFAULT_TEST_FRACTION = 0.2


def pretrain_setup(*, dataset: str = "cifar10", arch: str = "wrn-40-2",
                   data_root: DataSource | str | Path | None = None, resolution: int = 32,
                   imbalance_ratio: float | None = None, num_train: int | None = None,
                   data_seed: int = 0, seed: int = 0, stage: str = "pretrain", mean: Sequence[float] = CIFAR_MEAN,
                   std: Sequence[float] = CIFAR_STD, head: str | None = None, val_fraction: float | None = None,
                   test_fraction: float | None = None) -> tuple[RunMeta, ImageSet, FeatureModel]:
    """(checkpoint meta, ID training split, model freshly initialised from ``seed``) of a run from scratch.

    ``mean``/``std`` are the input normalisation, ``head`` the classification layer whose input is the feature
    vector (default: found automatically, see :class:`FeatureModel`). ``val_fraction`` holds a stratified, seeded
    validation part out of the train split (for calibrating detectors; never trained on). A dataset without a
    test split of its own (a ``folder:`` tree without ``train/``/``test/``) gets a test part held out first:
    ``test_fraction``, default :data:`DEFAULT_TEST_FRACTION`; both are recorded in the checkpoint.
    """
    source = as_source(data_root)
    dataset = resolve_dataset(dataset, source.root)
    own_test = has_test_split(dataset, source.root)
    if test_fraction is not None and own_test:
        raise ConfigError(f"{dataset} has a test split of its own; --test-fraction only applies to a folder: dataset "
                          "without split sub-folders.")
    if test_fraction is None and not own_test:
        test_fraction = DEFAULT_TEST_FRACTION
        log.warning("%s has no train/ and test/ sub-folders: holding out a seeded, stratified %.0f%% of it as the "
                    "test part (recorded in the checkpoint; --test-fraction changes it).", dataset,
                    100 * test_fraction)
    base = source.load(dataset, "train", resolution)
    carved = bool(test_fraction or val_fraction)
    meta = RunMeta(arch=arch, num_classes=base.num_classes, classes=base.classes, mean=tuple(mean),  # type: ignore[arg-type]
                   std=tuple(std), resolution=resolution, dataset=dataset, stage=stage, head=head,  # type: ignore[arg-type]
                   data_seed=data_seed, imbalance_ratio=imbalance_ratio, num_train=num_train,
                   test_fraction=test_fraction, val_fraction=val_fraction,
                   source_size=len(base) if carved else None)
    train = id_train_set(meta, source)
    meta = meta.replace(class_counts=tuple(int(c) for c in train.class_counts()))
    model = fresh_model(arch, train.num_classes, drop_rate=meta.drop_rate, seed=seed)
    return meta, train, FeatureModel(model, head)


#: Images of the ID test set (and of the validation part) whose accuracy pretraining reports after every epoch.
EPOCH_EVAL_IMAGES = 2000
#: ID train images and auxiliary outliers (each) whose energies propose or check margins (seeded samples).
MARGIN_IMAGES = 10000


def _seeded_subset(ds: ImageSet, count: int | None) -> ImageSet:
    """``count`` images of ``ds`` drawn with seed 0 (the same every epoch), or all of them."""
    if count is None or count >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=count, replace=False))
    return ds.subset(idx, f"{ds.name}-sample{count}")


def epoch_accuracy(meta: RunMeta, data_root: DataSource | str | Path | None,
                   images: int | None = EPOCH_EVAL_IMAGES) -> Callable[[nn.Module], dict[str, float]] | None:
    """A trainer hook that measures ``test_acc`` (and ``val_acc`` when a validation part is held out) after each
    epoch on a fixed seeded sample of ``images`` images of each (None: all; 0: no hook, None returned):
    reported, never used to choose anything."""
    if images == 0:
        log.info("pretrain: no per-epoch accuracy (--eval-images 0); `oodtune evaluate` measures the final model")
        return None
    _, val, _ = id_parts(meta, data_root)
    full = {"test_acc": id_test_set(meta, data_root), **({"val_acc": val} if val is not None else {})}
    sets = {key: _seeded_subset(ds, images) for key, ds in full.items()}
    log.info("pretrain: accuracy after every epoch on %s (--eval-images sets the sample; 0 turns it off)",
             ", ".join(f"{len(sets[k])} of {len(full[k])} {k.split('_')[0]} images" for k in sets))

    def measure(net: nn.Module) -> dict[str, float]:  # the trainer's FeatureModel
        fm = cast(FeatureModel, net)
        device = str(next(fm.parameters()).device)
        return {key: accuracy(compute_outputs(fm, ds, normalizer_for(meta), device=device).logits.cpu(), ds.labels)
                for key, ds in sets.items()}
    return measure


def pretrain(out: str | Path, *, dataset: str = "cifar10", arch: str = "wrn-40-2",
             data_root: DataSource | str | Path | None = None, config: TrainConfig | None = None,
             resolution: int = 32, imbalance_ratio: float | None = None, num_train: int | None = None,
             data_seed: int = 0, head: str | None = None, val_fraction: float | None = None,
             test_fraction: float | None = None, eval_images: int | None = EPOCH_EVAL_IMAGES) -> Path:
    """Standard cross-entropy training from scratch (:data:`~oodtune.training.config.PRETRAIN` recipe by
    default), reporting test (and validation) accuracy after every epoch on ``eval_images`` of each (a fixed
    seeded sample; None = all, 0 = none); returns the path of ``OUT/model.pt``.
    ``val_fraction``/``test_fraction``: see :func:`pretrain_setup`. ``OUT`` is locked against other writers from
    the start."""
    config = config or PRETRAIN
    source = as_source(data_root)
    with output_lock(out):
        check_run_dir(out)
        meta, train, net = pretrain_setup(dataset=dataset, arch=arch, data_root=source, resolution=resolution,
                                          imbalance_ratio=imbalance_ratio, num_train=num_train, data_seed=data_seed,
                                          seed=config.seed, head=head, val_fraction=val_fraction,
                                          test_fraction=test_fraction)
        Trainer(net, train, build_method_loss("ce"), config, normalizer=normalizer_for(meta), run_dir=out, meta=meta,
                epoch_metrics=epoch_accuracy(meta, source, eval_images)).fit()
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
    check_writable(out.parent, "choose another --out")
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
    return save_checkpoint(out, net, meta.replace(weights=str(weights)), overwrite=False)


def id_test_accuracy(checkpoint: str | Path, *, data_root: DataSource | str | Path | None = None,
                     device: str | None = None) -> float:
    """Top-1 accuracy of ``checkpoint`` on the test split of its ID dataset (a sanity check after import)."""
    net, meta = load_feature_model(checkpoint)
    test = id_test_set(meta, data_root)
    logits = compute_outputs(net, test, normalizer_for(meta), device=device).logits
    return accuracy(logits.cpu(), test.labels)


@dataclass(frozen=True)
class ClassificationEvaluation:
    """The classification task's evaluation options: ``validation``, the pair each score's hyperparameters are
    chosen on (:mod:`oodtune.scores.selection`; None: the papers' values)."""

    validation: ValidationSpec | None = None


class ClassificationTask(Task[FeatureModel, ClassificationEvaluation]):
    """Images in, class logits out; scores and metrics per image (see the module docstring)."""

    name = "classification"
    finetune_defaults = FINETUNE
    default_outliers = "tin-aux"

    def wrap(self, model: nn.Module, meta: RunMeta) -> FeatureModel:
        return FeatureModel(model, meta.head)

    def build_loss(self, method: str, meta: RunMeta, prior_gamma: torch.Tensor | None,
                   options: Mapping[str, Any]) -> CompositeLoss:
        return build_method_loss(method, prior_gamma=prior_gamma, **options)

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
        """Energies of a seeded sample of :data:`MARGIN_IMAGES` ID train images and as many outliers (margins
        are quantiles of these: a sample of 10k gives them to about 1 % of the spread)."""
        full = {"ID train": self.train_set(meta, source), outliers: source.load(outliers, "train", meta.resolution)}
        sets = {k: _seeded_subset(v, MARGIN_IMAGES) for k, v in full.items()}
        log.info("energies of the pretrained model on %s (seeded samples)",
                 " and ".join(f"{len(sets[k])} of {len(full[k])} {k} images" for k in sets))
        e_in, e_out = (energy(self._logits(net, meta, ds, device)).cpu() for ds in sets.values())
        return e_in, e_out

    def train(self, net: FeatureModel, meta: RunMeta, loss: CompositeLoss, config: TrainConfig, *,
              outliers: str | None, source: DataSource, run_dir: Path) -> Path:
        if config.train_part is not None or config.paste_mode != "object" or config.paste_share is not None:
            raise ConfigError("train_part, paste_mode and paste_share are segmentation options; a classifier "
                              "fine-tunes every layer on auxiliary images (drop them).")
        aux = source.load(outliers, "train", meta.resolution) if outliers else None
        Trainer(net, self.train_set(meta, source), loss, config, outliers=aux, normalizer=normalizer_for(meta),
                run_dir=run_dir, meta=meta).fit()
        return Path(run_dir) / FINAL

    def build_scores(self, meta: RunMeta, names: Sequence[str]) -> list[Score]:
        """Scores by name; ODIN gets the checkpoint's normalisation ``std``, so that its step ε is taken in [0, 1]
        pixel units as in the ODIN / energy_ood code (the network sees normalised inputs)."""
        return [build_score(n, std=meta.std) if n.strip().lower() == "odin" else build_score(n) for n in names]

    def validation_pair(self, meta: RunMeta, spec: ValidationSpec, ood: Sequence[str],
                        source: DataSource) -> Validation:
        """``spec.id_holdout`` never-trained-on ID images (:func:`id_unseen_set`, a seeded draw) and the outlier
        images of ``spec``; refuses an OOD test set as outliers."""
        if canonical_name(spec.outliers) in {canonical_name(o) for o in ood}:
            raise ConfigError(f"the validation outliers {spec.outliers!r} are also an OOD test set; choose held-out "
                              "auxiliary outliers (e.g. tin-aux-val), never a test set.")
        unseen = id_unseen_set(meta, source)
        if not 1 <= spec.id_holdout <= len(unseen):
            raise ConfigError(f"id_holdout must be between 1 and {len(unseen)} (the never-trained-on ID images: "
                              f"{unseen.name}), got {spec.id_holdout}.")
        perm = torch.randperm(len(unseen), generator=torch.Generator().manual_seed(spec.seed))
        outliers = source.load(spec.outliers, "test", meta.resolution, spec.num_outliers)
        return Validation(id_images=unseen.subset(np.sort(perm[: spec.id_holdout].numpy())), outliers=outliers)

    def evaluation_options(self, *, blur: bool = False,
                           validation: ValidationSpec | None = None,
                           id_metrics: bool = True, exact: bool = False,
                           also_blurred: bool = False) -> ClassificationEvaluation:
        if blur or also_blurred:
            raise ConfigError("blur smooths per-pixel score maps; it applies to segmentation checkpoints only.")
        if not id_metrics:
            raise ConfigError("--no-id-metrics skips segmentation's mIoU pass; a classifier's accuracy comes with "
                              "the ID scores at no extra cost: drop it.")
        if exact:
            raise ConfigError("--exact keys segmentation's streamed pixel counts by the full score; a classifier's "
                              "metrics are computed from every image's score and are always exact: drop it.")
        return ClassificationEvaluation(validation=validation)

    def evaluate(self, net: FeatureModel, meta: RunMeta, scores: Sequence[str], ood: Sequence[str], *,
                 source: DataSource, device: str | None, num_ood: int | None, batch_size: int,
                 positive: Positive | None, options: ClassificationEvaluation,
                 id_split: str = "test") -> EvalReport:
        validation = options.validation
        built = self.build_scores(meta, scores)
        id_test = id_test_set(meta, source, id_split)
        needs_train = validation is not None or any(s.needs_fit for s in built)
        id_train = self.train_set(meta, source) if needs_train else None
        # synthetic sets have no natural size: as many images as the ID test set, unless num_ood says otherwise
        ood_sets = {name: source.load(name, "test", meta.resolution,
                                      len(id_test) if num_ood is None and canonical_name(name) in GENERATORS
                                      else num_ood) for name in ood}
        pair = None if validation is None else self.validation_pair(meta, validation, ood, source)
        report = evaluate(net, normalizer_for(meta), id_test, ood_sets, built, id_train=id_train, device=device,
                          batch_size=batch_size, positive=positive, validation=pair)
        if meta.imbalance_ratio and report.id_logits is not None and id_test.labels is not None:
            report.id_metrics.update(long_tail_accuracy(report.id_logits, id_test.labels, meta.class_counts))
        return report


register_task(ClassificationTask())
