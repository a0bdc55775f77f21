"""End-to-end steps shared by the CLI and the benchmark: pretrain, estimate prior, fine-tune, evaluate.

Each step reads and writes oodtune checkpoints; the ID data a checkpoint was trained on is recorded in its
``meta`` (dataset name, long-tail ratio, subsample) so later steps rebuild exactly that *training* split.
Fine-tuning can only ever see the ID **train** split: ``id_train_set`` is the single place that loads ID
training data and it has no split argument (a public implementation fine-tuned on the test split).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import load_dataset
from .data.imageset import ImageSet
from .data.longtail import make_longtailed
from .energy import energy
from .evaluation import EvalReport, compute_outputs, evaluate
from .losses import build_method_loss
from .metrics import accuracy
from .models import FeatureModel, build_model
from .prior import OutlierPrior, count_outlier_predictions
from .scores import build_score
from .training.batches import CIFAR_MEAN, CIFAR_STD, Normalizer
from .training.checkpoint import (CheckpointError, load_feature_model, load_model, read_state_dict,
                                  save_checkpoint)
from .training.trainer import TrainConfig, Trainer


def id_train_set(meta: dict[str, Any], data_root: str | Path | None) -> ImageSet:
    """The ID training split recorded in ``meta`` (dataset, resolution, long-tail ratio, subsample)."""
    ds = load_dataset(meta["dataset"], data_root, "train", resolution=int(meta["resolution"]))
    if meta.get("imbalance_ratio"):
        ds = make_longtailed(ds, float(meta["imbalance_ratio"]), seed=int(meta.get("data_seed", 0)))
    if meta.get("num_train") and int(meta["num_train"]) < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(meta.get("data_seed", 0))))
        ds = ds.subset(idx[: int(meta["num_train"])].numpy())
    return ds


def normalizer_for(meta: dict[str, Any]) -> Normalizer:
    """The input normalisation a checkpoint was trained with."""
    return Normalizer(tuple(meta["mean"]), tuple(meta["std"]))


def fresh_model(arch: str, num_classes: int, *, drop_rate: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """A newly initialised classifier whose weights depend only on ``seed``, not on RNG use before the call."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes, drop_rate=drop_rate)


def pretrain_setup(*, dataset: str = "cifar10", arch: str = "wrn-40-2", data_root: str | Path | None = None,
                   resolution: int = 32, imbalance_ratio: float | None = None, num_train: int | None = None,
                   data_seed: int = 0, seed: int = 0, stage: str = "pretrain", mean: Sequence[float] = CIFAR_MEAN,
                   std: Sequence[float] = CIFAR_STD, head: str | None = None
                   ) -> tuple[dict[str, Any], ImageSet, FeatureModel]:
    """(checkpoint meta, ID training split, model freshly initialised from ``seed``) of a run from scratch.

    ``mean``/``std`` are the input normalisation, ``head`` the classification layer whose input is the feature
    vector (default: found automatically, see :class:`FeatureModel`)."""
    meta: dict[str, Any] = {
        "stage": stage, "dataset": dataset, "arch": arch, "resolution": resolution,
        "mean": list(mean), "std": list(std), "drop_rate": 0.3, "data_seed": data_seed,
        "imbalance_ratio": imbalance_ratio, "num_train": num_train, "head": head,
    }
    train = id_train_set(meta, data_root)
    meta.update(classes=list(train.classes), num_classes=train.num_classes,
                class_counts=train.class_counts().tolist())
    return meta, train, FeatureModel(fresh_model(arch, train.num_classes, drop_rate=meta["drop_rate"], seed=seed), head)


def pretrain(out: str | Path, *, dataset: str = "cifar10", arch: str = "wrn-40-2", data_root: str | Path | None = None,
             config: TrainConfig | None = None, resolution: int = 32, imbalance_ratio: float | None = None,
             num_train: int | None = None, data_seed: int = 0, head: str | None = None) -> Path:
    """Standard cross-entropy training from scratch; returns the path of ``OUT/model.pt``."""
    config = config or TrainConfig()
    meta, train, net = pretrain_setup(dataset=dataset, arch=arch, data_root=data_root, resolution=resolution,
                                      imbalance_ratio=imbalance_ratio, num_train=num_train, data_seed=data_seed,
                                      seed=config.seed, head=head)
    trainer = Trainer(net, train, build_method_loss("ce"), config, normalizer=normalizer_for(meta), run_dir=out, meta=meta)
    return trainer.fit().checkpoint


def estimate_prior(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: str | Path | None = None,
                   gamma: float = 1.0, batch_size: int = 1024, device: str | None = None) -> OutlierPrior:
    """Balanced Energy step 1: P(y=i|o) from the pretrained model's argmax predictions on the outlier set."""
    net, meta = load_feature_model(checkpoint)
    aux = load_dataset(outliers, data_root, "train", resolution=int(meta["resolution"]))
    logits = compute_outputs(net, aux, normalizer_for(meta), device=device, batch_size=batch_size).logits
    counts = count_outlier_predictions(lambda t: t, logits.split(batch_size), int(meta["num_classes"]))
    return OutlierPrior(counts=counts.tolist(), gamma=gamma, class_names=list(meta["classes"]))


def pretrained_energies(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: str | Path | None = None,
                        device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies E(x) of the pretrained model on its ID *train* split and on the auxiliary outliers (CPU)."""
    net, meta = load_feature_model(checkpoint)
    norm = normalizer_for(meta)
    e_in = energy(compute_outputs(net, id_train_set(meta, data_root), norm, device=device).logits).cpu()
    aux = load_dataset(outliers, data_root, "train", resolution=int(meta["resolution"]))
    return e_in, energy(compute_outputs(net, aux, norm, device=device).logits).cpu()


def finetune(checkpoint: str | Path, out: str | Path, *, method: str, data_root: str | Path | None = None,
             outliers: str | None = "tin-aux", prior: OutlierPrior | None = None, config: TrainConfig | None = None,
             loss_options: dict[str, float] | None = None, from_scratch: bool = False) -> Path:
    """Fine-tune a pretrained checkpoint with ``method`` (oe, energy-oe, balanced-energy, sparsity, a+b, ...).

    Defaults follow the Energy paper's CIFAR fine-tuning: 10 epochs, lr 1e-3, cosine, batch 128 ID + 256
    outliers. Balanced Energy needs ``prior`` (from ``estimate_prior``). ``from_scratch`` trains a freshly
    initialised network of the checkpoint's architecture on the same ID data instead (the papers' "scratch"
    baselines; give it a pretraining-length ``config``).
    """
    config = config or TrainConfig(epochs=10, lr=1e-3)
    model, meta = load_model(checkpoint)
    meta = dict(meta)
    if from_scratch:
        model = fresh_model(meta["arch"], int(meta["num_classes"]), drop_rate=float(meta.get("drop_rate", 0.3)),
                            seed=config.seed)
    gamma_prior = None if prior is None else prior.gamma_prior()
    loss = build_method_loss(method, prior_gamma=gamma_prior, **(loss_options or {}))
    train = id_train_set(meta, data_root)
    aux = None
    if loss.needs_outliers:
        if not outliers:
            raise ValueError(f"method {method!r} needs auxiliary outliers; pass --outliers NAME.")
        aux = load_dataset(outliers, data_root, "train", resolution=int(meta["resolution"]))
    meta.update(stage="scratch" if from_scratch else "finetune", method=method, pretrained=str(checkpoint), outliers=outliers if aux else None,
                loss_options=loss_options or {}, prior=None if prior is None else prior.to_dict())
    net = FeatureModel(model.train(), meta.get("head"))
    trainer = Trainer(net, train, loss, config, outliers=aux, normalizer=normalizer_for(meta), run_dir=out, meta=meta)
    return trainer.fit().checkpoint


def evaluate_checkpoint(checkpoint: str | Path, *, scores: Sequence[str], ood: Sequence[str],
                        data_root: str | Path | None = None, device: str | None = None, num_ood: int | None = None,
                        batch_size: int = 1024, positive: str | None = None) -> tuple[EvalReport, dict[str, Any]]:
    """Evaluate a checkpoint with the named scores on the named OOD sets; returns (report, meta)."""
    net, meta = load_feature_model(checkpoint)
    res = int(meta["resolution"])
    built = [build_score(s) for s in scores]
    id_test = load_dataset(meta["dataset"], data_root, "test", resolution=res)
    id_train = id_train_set(meta, data_root) if any(s.needs_fit for s in built) else None
    ood_sets = {name: load_dataset(name, data_root, "test", resolution=res, num_images=num_ood) for name in ood}
    report = evaluate(net, normalizer_for(meta), id_test, ood_sets, built, id_train=id_train,
                      device=device, batch_size=batch_size, positive=positive)
    return report, meta


def import_model(weights: str | Path, out: str | Path, *, arch: str, dataset: str = "cifar10",
                 data_root: str | Path | None = None, resolution: int = 32, mean: Sequence[float] = CIFAR_MEAN,
                 std: Sequence[float] = CIFAR_STD, head: str | None = None) -> Path:
    """Turn a classifier trained elsewhere into an oodtune checkpoint at ``out``, so that estimate-prior,
    propose-margins, finetune, evaluate and benchmark work on it.

    ``arch`` rebuilds it (a built-in name or ``package.module:factory``), ``weights`` is its saved state_dict
    (see :func:`read_state_dict`), ``dataset`` the ID data it was trained on (its class count must match the
    model's), ``mean``/``std`` the normalisation it was trained with (on [0, 1] pixels), ``head`` the layer whose
    input is the feature vector.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing is overwritten).")
    meta, _, net = pretrain_setup(dataset=dataset, arch=arch, data_root=data_root, resolution=resolution,
                                  stage="imported", mean=mean, std=std, head=head)
    classes = int(meta["num_classes"])
    try:
        net.model.load_state_dict(read_state_dict(weights))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit --arch {arch} with {classes} classes ({dataset}): {exc}") from exc
    try:
        with torch.no_grad():
            logits, _ = net.eval()(torch.zeros(2, 3, resolution, resolution))
    except RuntimeError as exc:
        raise ValueError(f"--arch {arch} fails on a batch of {resolution}x{resolution} images: {exc} "
                         "(on the command line: --head NAME)") from exc
    if logits.shape != (2, classes) or net.num_classes != classes:
        raise ValueError(f"the model gives {tuple(logits.shape[1:])} logits per image from a head with "
                         f"{net.num_classes} outputs, but {dataset} has {classes} classes; use --head to name the "
                         "layer that produces the logits, or weights trained on this dataset.")
    meta["weights"] = str(weights)
    return save_checkpoint(out, net, meta)


def id_test_accuracy(checkpoint: str | Path, *, data_root: str | Path | None = None, device: str | None = None) -> float:
    """Top-1 accuracy of ``checkpoint`` on the test split of its ID dataset (a sanity check after import)."""
    net, meta = load_feature_model(checkpoint)
    test = load_dataset(meta["dataset"], data_root, "test", resolution=int(meta["resolution"]))
    logits = compute_outputs(net, test, normalizer_for(meta), device=device).logits
    return accuracy(logits.cpu(), test.labels)
