"""The application layer: every end-to-end step the CLI and the benchmark run, each reading and writing oodtune
checkpoints.

Steps: :func:`pretrain` and :func:`import_model` (a model enters), :func:`estimate_prior` / :func:`save_prior`
(Balanced Energy step 1), :func:`propose_margins` (energy margins from the pretrained model), :func:`finetune`
(any method, on the ID *train* split only) and :func:`evaluate_checkpoint`. Task-specific work (data, forward
passes, the training loop, detection metrics) is delegated to the checkpoint's :class:`~.task.Task`; the steps
themselves are the same for every task. Datasets come from a :class:`DataSource` (a data root, memoised), so
a caller that runs many steps (the benchmark) decodes and loads each set once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..evaluation import EvalReport
from ..losses import build_method_loss
from ..margins import margin_coverage
from ..margins import propose_margins as _propose
from ..metrics.ood import Positive
from ..models import FeatureModel, RunMeta, load_feature_model, load_model, read_meta
from ..plots import plot_class_prior
from ..prior import OutlierPrior
from ..training.config import TrainConfig
from .classification import (
    fresh_model,
    id_test_accuracy,
    id_train_set,
    import_model,
    normalizer_for,
    pretrain,
    pretrain_setup,
)
from .source import DataSource, as_source
from .task import Task, ValidationSpec, register_task, task_of

__all__ = [
    "DataSource", "MarginProposal", "Task", "as_source", "estimate_prior", "evaluate_checkpoint", "finetune",
    "finetune_config", "fresh_model", "id_test_accuracy", "id_train_set", "import_model", "normalizer_for",
    "pretrain", "pretrain_setup", "pretrained_energies", "propose_margins", "register_task", "save_prior", "task_of",
    "ValidationSpec",
]

Root = DataSource | str | Path | None


def estimate_prior(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None, gamma: float = 1.0,
                   device: str | None = None) -> OutlierPrior:
    """Balanced Energy step 1: P(y=i|o) from the pretrained model's argmax predictions on the outlier set."""
    net, meta = load_feature_model(checkpoint)
    counts = task_of(meta).prior_counts(net, meta, outliers, as_source(data_root), device)
    return OutlierPrior(counts=counts.tolist(), gamma=gamma, class_names=list(meta.classes))


def save_prior(prior: OutlierPrior, out: str | Path, *, checkpoint: str | Path | None = None,
               plot: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``prior`` as JSON to ``out``; with ``plot``, also a bar chart of the checkpoint's ID class counts
    next to the prior."""
    path = prior.save(out, overwrite=overwrite)
    if plot is not None:
        counts = list(read_meta(checkpoint).class_counts) if checkpoint is not None else []
        plot_class_prior(plot, counts or [0] * prior.num_classes, prior.probabilities().tolist(), prior.class_names)
    return path


def pretrained_energies(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None,
                        device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies E(x) of the pretrained model on its ID *train* split and on the auxiliary outliers (CPU)."""
    net, meta = load_feature_model(checkpoint)
    return task_of(meta).energies(net, meta, outliers, as_source(data_root), device)


@dataclass(frozen=True)
class MarginProposal:
    """Energy margins proposed from a pretrained model (see :mod:`oodtune.margins`) and what they act on."""

    m_in: float
    m_out: float
    coverage_in: float  # fraction of ID train samples with E > m_in (pushed down at the start)
    coverage_out: float  # fraction of auxiliary outliers with E < m_out (pushed up at the start)
    median_in: float
    median_out: float

    def as_options(self) -> dict[str, float]:
        return {"m_in": self.m_in, "m_out": self.m_out}


def propose_margins(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None,
                    device: str | None = None) -> MarginProposal:
    """m_in / m_out from the pretrained model's energies on ID *train* data and the auxiliary outliers (never on
    an OOD test set)."""
    e_in, e_out = pretrained_energies(checkpoint, outliers=outliers, data_root=data_root, device=device)
    m_in, m_out = _propose(e_in, e_out)
    cov_in, cov_out = margin_coverage(e_in, e_out, m_in, m_out)
    return MarginProposal(m_in, m_out, cov_in, cov_out, float(e_in.median()), float(e_out.median()))


def finetune_config(checkpoint: str | Path, **overrides: Any) -> TrainConfig:
    """The fine-tuning settings for ``checkpoint``: its task's reference recipe with ``overrides`` applied
    (``None`` means "not given")."""
    return task_of(read_meta(checkpoint)).finetune_defaults.replace(**overrides)


def finetune(checkpoint: str | Path, out: str | Path, *, method: str, data_root: Root = None,
             outliers: str | None = "tin-aux", prior: OutlierPrior | None = None, config: TrainConfig | None = None,
             loss_options: Mapping[str, Any] | None = None, from_scratch: bool = False) -> Path:
    """Fine-tune a pretrained checkpoint with ``method`` (oe, energy-oe, balanced-energy, sparsity, a+b, ...).

    ``config`` defaults to the task's reference recipe (classification: the Energy paper's CIFAR fine-tuning,
    10 epochs, lr 1e-3, cosine, batch 128 ID + 256 outliers). Balanced Energy needs ``prior`` (from
    :func:`estimate_prior`). ``from_scratch`` trains a freshly initialised network of the checkpoint's
    architecture on the same ID data instead (the papers' "scratch" baselines; give it a pretraining-length
    ``config``).
    """
    model, meta = load_model(checkpoint)
    task = task_of(meta)
    config = config or task.finetune_defaults
    if from_scratch:
        model = task.fresh_model(meta, config.seed)
    gamma_prior = None if prior is None else prior.gamma_prior()
    options = dict(loss_options or {})
    loss = build_method_loss(method, prior_gamma=gamma_prior, **options)
    if loss.needs_outliers and not outliers:
        raise ConfigError(f"method {method!r} needs auxiliary outliers; pass --outliers NAME.")
    used_outliers = outliers if loss.needs_outliers else None
    meta = meta.replace(stage="scratch" if from_scratch else "finetune", method=method, pretrained=str(checkpoint),
                        outliers=used_outliers, loss_options=options,
                        prior=None if prior is None else prior.to_dict(), history=(), train_config=None)
    net = FeatureModel(model.train(), meta.head)
    return task.train(net, meta, loss, config, outliers=used_outliers, source=as_source(data_root), run_dir=Path(out))


def evaluate_checkpoint(checkpoint: str | Path, *, scores: Sequence[str], ood: Sequence[str], data_root: Root = None,
                        device: str | None = None, num_ood: int | None = None, batch_size: int = 1024,
                        positive: Positive | None = None,
                        validation: ValidationSpec | None = None) -> tuple[EvalReport, RunMeta]:
    """Evaluate a checkpoint with the named scores on the named OOD sets; returns (report, meta).

    Scores keep their papers' hyperparameters, unless ``validation`` names a validation pair (held-out ID train
    images + held-out auxiliary outliers) to choose them on (:mod:`oodtune.scores.selection`; the choices are in
    ``report.selections``)."""
    net, meta = load_feature_model(checkpoint)
    task = task_of(meta)
    extra = {} if validation is None else {"validation": validation}  # tasks without selection keep working
    report = task.evaluate(net, meta, scores, ood, source=as_source(data_root), device=device, num_ood=num_ood,
                           batch_size=batch_size, positive=positive, **extra)
    return report, meta
