"""What differs between tasks, behind one interface, so every pipeline step (and the benchmark grid over them)
works unchanged for each.

A :class:`Task` knows its data (the ID training split a checkpoint records, auxiliary outliers, OOD test sets),
how to run its model over them (class logits of images; for pixel-wise tasks, B×K×H×W logits), its training
loop, and how its detection is measured. The steps in :mod:`oodtune.pipeline` read a checkpoint's
``RunMeta.task`` and hand the work to the registered task; classification is :mod:`.classification`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..evaluation import EvalReport
from ..losses import CompositeLoss
from ..metrics.ood import Positive
from ..models import FeatureModel, RunMeta
from ..training.config import TrainConfig
from .source import DataSource

__all__ = ["Task", "ValidationSpec", "register_task", "task_of", "TASK_REGISTRY"]


@dataclass(frozen=True)
class ValidationSpec:
    """The validation pair that score hyperparameters are chosen on (:mod:`oodtune.scores.selection`):
    ``id_holdout`` images of the checkpoint's ID *train* split, drawn with ``seed`` and held out of the statistics
    fit while selecting, and the held-out auxiliary outlier set ``outliers`` (``num_outliers``: a seeded
    subsample). Never an OOD test set."""

    outliers: str
    id_holdout: int = 1000
    num_outliers: int | None = None
    seed: int = 0


class Task(ABC):
    """One kind of model and data (see the module docstring). Implementations are stateless."""

    name: str
    #: Fine-tuning settings when the user gives none (the reference recipe of the task's papers).
    finetune_defaults: TrainConfig

    @abstractmethod
    def train_set(self, meta: RunMeta, source: DataSource) -> Any:
        """The ID *training* split recorded in ``meta`` (never a test split)."""

    @abstractmethod
    def fresh_model(self, meta: RunMeta, seed: int) -> nn.Module:
        """A newly initialised model of ``meta``'s architecture whose weights depend only on ``seed``."""

    @abstractmethod
    def prior_counts(self, net: FeatureModel, meta: RunMeta, outliers: str, source: DataSource,
                     device: str | None) -> torch.Tensor:
        """N_i: how often the pretrained ``net`` predicts class i (argmax) on the auxiliary outliers; (K,) int64."""

    @abstractmethod
    def energies(self, net: FeatureModel, meta: RunMeta, outliers: str, source: DataSource,
                 device: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies E = -logsumexp f of ``net`` on the ID training split and on the auxiliary outliers (CPU)."""

    @abstractmethod
    def train(self, net: FeatureModel, meta: RunMeta, loss: CompositeLoss, config: TrainConfig, *,
              outliers: str | None, source: DataSource, run_dir: Path) -> Path:
        """Train ``net`` with ``loss`` on the ID training split (and ``outliers``); returns the final checkpoint."""

    @abstractmethod
    def evaluate(self, net: FeatureModel, meta: RunMeta, scores: Sequence[str], ood: Sequence[str], *,
                 source: DataSource, device: str | None, num_ood: int | None, batch_size: int,
                 positive: Positive | None, validation: ValidationSpec | None = None) -> EvalReport:
        """ID-task metrics on the ID test split and detection metrics of each score on each OOD set; with
        ``validation``, each score's hyperparameters are first chosen on that validation pair."""


TASK_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available to every pipeline step under ``task.name``."""
    TASK_REGISTRY[task.name] = task
    return task


def task_of(meta: RunMeta) -> Task:
    """The registered task of a checkpoint."""
    try:
        return TASK_REGISTRY[meta.task]
    except KeyError:
        raise CheckpointError(f"no pipeline for task {meta.task!r}; known: {', '.join(TASK_REGISTRY)}.") from None
