"""What differs between tasks, behind one interface, so every pipeline step (and the benchmark grid over them)
works unchanged for each.

A :class:`Task` knows its data (the ID training split a checkpoint records, auxiliary outliers, OOD test sets),
how to wrap and run its model (class logits of images; for pixel-wise tasks, B×C×H×W logits), its losses, its
training loop, and how its detection is measured. The steps in :mod:`oodtune.pipeline` read a checkpoint's
``RunMeta.task`` and hand the work to the registered task; classification is :mod:`.classification`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from ..data.tensors import Normalizer
from ..errors import CheckpointError
from ..evaluation.classification import EvalReport
from ..losses.terms import CompositeLoss
from ..metrics.ood import Positive
from ..models import RunMeta
from ..scores import Score
from ..training.config import TrainConfig
from .source import DataSource

__all__ = ["Task", "ValidationSpec", "normalizer_for", "register_task", "task_of", "TASK_REGISTRY"]


def normalizer_for(meta: RunMeta) -> Normalizer:
    """The input normalisation a checkpoint's network was trained with: mean/std on [0, 1] pixels and its channel
    order (RGB, or BGR for the published ESPNets), for every task."""
    return Normalizer(meta.mean, meta.std, bgr=meta.channel_order == "bgr")


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


#: The wrapper a task runs its networks in (classification: FeatureModel; segmentation: SegmentationModel).
Net = TypeVar("Net", bound=nn.Module)
#: A task's own evaluation options (classification: ClassificationEvaluation; segmentation: SegmentationEvaluation).
Options = TypeVar("Options")


class Task(ABC, Generic[Net, Options]):
    """One kind of model and data (see the module docstring). Implementations are stateless."""

    name: str
    #: Fine-tuning settings when the user gives none (the reference recipe of the task's papers).
    finetune_defaults: TrainConfig
    #: The auxiliary outlier set of the task's reference protocol (the command line's default --outliers).
    default_outliers: str

    @abstractmethod
    def wrap(self, model: nn.Module, meta: RunMeta) -> Net:
        """``model`` (as rebuilt from a checkpoint) in the wrapper this task's steps run it in."""

    @abstractmethod
    def build_loss(self, method: str, meta: RunMeta, prior_gamma: torch.Tensor | None,
                   options: Mapping[str, Any]) -> CompositeLoss:
        """The fine-tuning loss of ``method`` for ``meta``'s model, ``options`` overriding the defaults."""

    @abstractmethod
    def train_set(self, meta: RunMeta, source: DataSource) -> Any:
        """The ID *training* split recorded in ``meta`` (never a test split)."""

    @abstractmethod
    def fresh_model(self, meta: RunMeta, seed: int) -> nn.Module:
        """A newly initialised model of ``meta``'s architecture whose weights depend only on ``seed``."""

    @abstractmethod
    def prior_counts(self, net: Net, meta: RunMeta, outliers: str, source: DataSource,
                     device: str | None) -> torch.Tensor:
        """N_i: how often the pretrained ``net`` predicts class i (argmax) on the auxiliary outliers; (K,) int64."""

    @abstractmethod
    def energies(self, net: Net, meta: RunMeta, outliers: str, source: DataSource,
                 device: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies E = -logsumexp f of ``net`` on the ID training split and on the auxiliary outliers (CPU)."""

    @abstractmethod
    def train(self, net: Net, meta: RunMeta, loss: CompositeLoss, config: TrainConfig, *,
              outliers: str | None, source: DataSource, run_dir: Path) -> Path:
        """Train ``net`` with ``loss`` on the ID training split (and ``outliers``); returns the final checkpoint."""

    @abstractmethod
    def build_scores(self, meta: RunMeta, names: Sequence[str]) -> list[Score]:
        """The named post-hoc scores, configured for ``meta``'s model (e.g. ODIN's input step in pixel units)."""

    @abstractmethod
    def evaluation_options(self, *, blur: bool = False, validation: ValidationSpec | None = None,
                           id_metrics: bool = True, exact: bool = False, also_blurred: bool = False) -> Options:
        """This task's evaluation options from the keywords of :func:`oodtune.pipeline.evaluate_checkpoint` (and the
        command line's flags); an option of another task is refused with a ConfigError naming the task it is for.
        ``id_metrics=False`` skips ID-task metrics that cost a pass of their own (segmentation's mIoU); ``exact``
        makes streamed metrics exact (segmentation's pixel counts); ``also_blurred`` adds the blurred maps'
        report (segmentation)."""

    @abstractmethod
    def evaluate(self, net: Net, meta: RunMeta, scores: Sequence[str], ood: Sequence[str], *,
                 source: DataSource, device: str | None, num_ood: int | None, batch_size: int,
                 positive: Positive | None, options: Options, id_split: str = "test") -> EvalReport:
        """ID-task metrics on the ID ``id_split`` split (the test split; ``val`` when choosing hyper-parameters)
        and detection metrics of each score on each OOD set, with this task's ``options``."""


TASK_REGISTRY: dict[str, Task[Any, Any]] = {}


def register_task(task: Task[Any, Any]) -> Task[Any, Any]:
    """Make ``task`` available to every pipeline step under ``task.name``."""
    TASK_REGISTRY[task.name] = task
    return task


def task_of(meta: RunMeta) -> Task[Any, Any]:
    """The registered task of a checkpoint."""
    try:
        return TASK_REGISTRY[meta.task]
    except KeyError:
        raise CheckpointError(f"no pipeline for task {meta.task!r}; known: {', '.join(TASK_REGISTRY)}.") from None
