"""The application layer: every end-to-end step the CLI and the benchmark run, each reading and writing oodtune
checkpoints.

Steps: :func:`pretrain`, :func:`import_model` and :func:`import_segmenter` (a model enters),
:func:`estimate_prior` / :func:`save_prior` (Balanced Energy step 1), :func:`propose_margins` (energy margins
from the pretrained model), :func:`finetune` (any method, on the ID *train* split only),
:func:`evaluate_checkpoint`, and the deployment steps :func:`calibrate` (a detector's threshold on held-out ID
data) and :func:`predict` (:mod:`.detect`). ``id_data`` renames a checkpoint's ID dataset (a moved folder) for
the steps that read it.

Task-specific work (data, forward passes, the training loop, detection metrics) is delegated to the checkpoint's
:class:`~.task.Task`; the steps themselves are the same for every task. Datasets come from a
:class:`DataSource` (a data root, memoised), so a caller that runs many steps (the benchmark) decodes and loads
each set once.

A checkpoint whose architecture is an import path is loaded only inside a
``with oodtune.models.trusted_archs("package.module:factory"):`` block (the command line's ``--trust-arch``): a
checkpoint never makes oodtune import code. Run folders are locked against a second writer and checked (finished?
writable?) before any data is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..evaluation.classification import EvalReport
from ..losses.margins import default_margin_warning, margin_coverage
from ..losses.margins import propose_margins as _propose
from ..losses.prior import DEFAULT_GAMMA, OutlierPrior
from ..metrics.ood import Positive
from ..models import RunMeta, file_sha256, load_model, read_meta
from ..plots import plot_class_prior
from ..training.config import TrainConfig
from ..training.trainer import check_run_dir
from ..utils.lock import output_lock
from .classification import (
    DEFAULT_TEST_FRACTION,
    fresh_model,
    id_parts,
    id_test_accuracy,
    id_test_set,
    id_train_set,
    id_unseen_set,
    import_model,
    pretrain,
    pretrain_setup,
)
from .detect import CALIBRATION_CHOICES, calibrate, predict
from .pixel_detect import calibrate_segmenter, predict_frames
from .segmentation import anomaly_examples, id_test_miou, import_segmenter
from .source import DataSource, as_source, with_id_data
from .task import Task, ValidationSpec, normalizer_for, register_task, task_of

__all__ = [
    "CALIBRATION_CHOICES", "DEFAULT_TEST_FRACTION", "DataSource", "MarginProposal", "Task", "ValidationSpec",
    "anomaly_examples", "as_source", "calibrate", "calibrate_segmenter", "default_outliers", "estimate_prior",
    "evaluate_checkpoint", "finetune", "finetune_config", "fresh_model", "id_parts", "id_test_accuracy",
    "id_test_miou", "id_test_set", "id_train_set", "id_unseen_set", "import_model", "import_segmenter",
    "load_task_model", "normalizer_for", "predict", "predict_frames", "pretrain",
    "pretrain_setup", "pretrained_energies", "propose_margins", "register_task", "save_prior", "task_of",
    "with_id_data",
]

Root = DataSource | str | Path | None
log = logging.getLogger(__name__)


def load_task_model(checkpoint: str | Path, *, id_data: str | None = None,
                    source: DataSource | None = None) -> tuple[Any, RunMeta, Task[Any, Any]]:
    """(the checkpoint's network in its task's wrapper, in eval mode; its meta, with the ID dataset renamed to
    ``id_data`` when given; its task)."""
    model, meta = load_model(checkpoint)
    meta = with_id_data(meta, id_data, source or as_source(None))
    task = task_of(meta)
    return task.wrap(model, meta), meta, task


def estimate_prior(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None,
                   gamma: float = DEFAULT_GAMMA, device: str | None = None) -> OutlierPrior:
    """Balanced Energy step 1: P(y=i|o) from the pretrained model's argmax predictions on the outlier set."""
    net, meta, task = load_task_model(checkpoint)
    counts = task.prior_counts(net, meta, outliers, as_source(data_root), device)
    return OutlierPrior(counts=counts.tolist(), gamma=gamma, class_names=list(meta.classes))


def save_prior(prior: OutlierPrior, out: str | Path, *, checkpoint: str | Path | None = None,
               plot: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``prior`` as JSON to ``out``; with ``plot``, also a bar chart of the checkpoint's ID class counts
    next to the prior P and, when γ ≠ 1, the P_γ the Balanced Energy loss uses."""
    path = prior.save(out, overwrite=overwrite)
    if plot is not None:
        counts = list(read_meta(checkpoint).class_counts) if checkpoint is not None else []
        plot_class_prior(plot, counts or [0] * prior.num_classes, prior.probabilities().tolist(), prior.class_names,
                         gamma_priors={prior.gamma: prior.gamma_prior().tolist()} if prior.gamma != 1.0 else None)
    return path


def pretrained_energies(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None,
                        device: str | None = None, id_data: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies E(x) of the pretrained model on its ID *train* split and on the auxiliary outliers (CPU); for
    segmentation, of a seeded sample of pixels (labelled ID pixels and pasted-object pixels of the train frames)."""
    source = as_source(data_root)
    net, meta, task = load_task_model(checkpoint, id_data=id_data, source=source)
    return task.energies(net, meta, outliers, source, device)


@dataclass(frozen=True)
class MarginProposal:
    """Energy margins proposed from a pretrained model (see :mod:`oodtune.losses.margins`) and what they act on."""

    m_in: float
    m_out: float
    coverage_in: float  # fraction of ID train samples with E > m_in (pushed down at the start)
    coverage_out: float  # fraction of auxiliary outliers with E < m_out (pushed up at the start)
    median_in: float
    median_out: float

    def as_options(self) -> dict[str, float]:
        return {"m_in": self.m_in, "m_out": self.m_out}


def propose_margins(checkpoint: str | Path, *, outliers: str = "tin-aux", data_root: Root = None,
                    device: str | None = None, id_data: str | None = None) -> MarginProposal:
    """m_in / m_out from the pretrained model's energies on ID *train* data and the auxiliary outliers (never on
    an OOD test set)."""
    e_in, e_out = pretrained_energies(checkpoint, outliers=outliers, data_root=data_root, device=device,
                                      id_data=id_data)
    m_in, m_out = _propose(e_in, e_out)
    cov_in, cov_out = margin_coverage(e_in, e_out, m_in, m_out)
    return MarginProposal(m_in, m_out, cov_in, cov_out, float(e_in.median()), float(e_out.median()))


def default_outliers(checkpoint: str | Path) -> str:
    """The auxiliary outlier set of ``checkpoint``'s task protocol (classification: tin-aux; segmentation: the
    coco-objects bank)."""
    return task_of(read_meta(checkpoint)).default_outliers


def finetune_config(checkpoint: str | Path, **overrides: Any) -> TrainConfig:
    """The fine-tuning settings for ``checkpoint``: its task's reference recipe with ``overrides`` applied
    (``None`` means "not given")."""
    return task_of(read_meta(checkpoint)).finetune_defaults.replace(**overrides)


MARGINS = ("m_in", "m_out")


def finetune(checkpoint: str | Path, out: str | Path, *, method: str, data_root: Root = None,
             outliers: str | None = "tin-aux", prior: OutlierPrior | None = None, config: TrainConfig | None = None,
             loss_options: Mapping[str, Any] | None = None, from_scratch: bool = False,
             id_data: str | None = None) -> Path:
    """Fine-tune a pretrained checkpoint with ``method`` (classification: oe, energy-oe, balanced-energy, sparsity,
    a+b, ...; segmentation: energy-oe, balanced-energy, pebal, balanced-pebal, ce).

    ``config`` defaults to the task's reference recipe (classification: the Energy paper's CIFAR fine-tuning,
    10 epochs, lr 1e-3, cosine, batch 128 ID + 256 outliers; segmentation: PEBAL's, see
    :mod:`oodtune.pipeline.segmentation`). Balanced Energy needs ``prior`` (from
    :func:`estimate_prior`). ``from_scratch`` trains a freshly initialised network of the checkpoint's
    architecture on the same ID data instead (the papers' "scratch" baselines; give it a pretraining-length
    ``config``). ``loss_options`` ``m_in``/``m_out`` may be ``"auto"``: proposed as :func:`propose_margins` does
    (recorded in the checkpoint's notes); margins left at their CIFAR/WRN-40-2 defaults are checked against this
    model's energies and a warning is logged when they do not fit it. ``out`` is locked against other writers and
    checked before any data is loaded; the run records the SHA-256 of ``checkpoint`` so that it resumes only from
    the same base weights.
    """
    source = as_source(data_root)
    model, meta = load_model(checkpoint)
    meta = with_id_data(meta, id_data, source)
    task = task_of(meta)
    config = config or task.finetune_defaults
    options = dict(loss_options or {})
    notes = dict(meta.notes)
    auto = [k for k in MARGINS if options.get(k) == "auto"]
    gamma_prior = None if prior is None else prior.gamma_prior()
    with output_lock(out):
        check_run_dir(out)
        if auto:  # check the method takes margins before spending forward passes on proposing them
            task.build_loss(method, meta, gamma_prior, {**options, "m_in": -1.0, "m_out": 1.0})
            p = propose_margins(checkpoint, outliers=outliers or task.default_outliers, data_root=source,
                                device=config.device, id_data=id_data)
            options.update({k: v for k, v in p.as_options().items() if k in auto})
            notes["margins"] = (f"{', '.join(auto)} proposed from the pretrained model's energies (median ID train "
                                f"{p.median_in:.2f}, outliers {p.median_out:.2f}): m_in {p.m_in:.3f}, "
                                f"m_out {p.m_out:.3f}")
            log.info("margins: %s", notes["margins"])
        loss = task.build_loss(method, meta, gamma_prior, options)
        if loss.needs_outliers and not outliers:
            raise ConfigError(f"method {method!r} needs auxiliary outliers; pass --outliers NAME.")
        used_outliers = outliers if loss.needs_outliers else None
        defaults = {k: float(getattr(t, k)) for t in loss.terms for k in MARGINS if hasattr(t, k) and k not in options}
        if defaults and used_outliers:
            e_in, e_out = task.energies(task.wrap(model, meta), meta, used_outliers, source, config.device)
            warning = default_margin_warning(e_in, e_out, defaults)
            if warning:
                log.warning(warning)
        if from_scratch:
            model = task.fresh_model(meta, config.seed)
        meta = meta.replace(stage="scratch" if from_scratch else "finetune", method=method, pretrained=str(checkpoint),
                            pretrained_sha256=file_sha256(checkpoint), outliers=used_outliers, loss_options=options,
                            notes=notes, prior=None if prior is None else prior.to_dict(), history=(),
                            train_config=None)
        net = task.wrap(model.train(), meta)
        return task.train(net, meta, loss, config, outliers=used_outliers, source=source, run_dir=Path(out))


def evaluate_checkpoint(checkpoint: str | Path, *, scores: Sequence[str], ood: Sequence[str], data_root: Root = None,
                        device: str | None = None, num_ood: int | None = None, batch_size: int = 1024,
                        positive: Positive | None = None, id_split: str = "test", blur: bool = False,
                        id_data: str | None = None, validation: ValidationSpec | None = None,
                        id_metrics: bool = True, exact: bool = False, also_blurred: bool = False
                        ) -> tuple[EvalReport, RunMeta]:
    """Evaluate a checkpoint with the named scores on the named OOD sets; returns (report, meta). The ID-task
    metrics come from the ID ``id_split`` split (``val`` when choosing hyper-parameters without the test split);
    ``blur`` Gaussian-blurs segmentation score maps (kernel 7, σ 1) as PEBAL's test code can.

    Scores keep their papers' hyperparameters, unless ``validation`` names a validation pair (never-trained-on
    ID images + held-out auxiliary outliers) to choose them on (:mod:`oodtune.scores.selection`; the choices are in
    ``report.selections``; classification only). ``id_metrics=False`` skips segmentation's mIoU pass; ``exact``
    counts segmentation pixels by their full float32 score (exact AUROC / AP / FPR95, more memory);
    ``also_blurred`` measures the blurred segmentation maps too, from the same forward passes (``report.blurred``)."""
    source = as_source(data_root)
    net, meta, task = load_task_model(checkpoint, id_data=id_data, source=source)
    options = task.evaluation_options(blur=blur, validation=validation, id_metrics=id_metrics,  # before any pass
                                      exact=exact, also_blurred=also_blurred)
    report = task.evaluate(net, meta, scores, ood, source=source, device=device, num_ood=num_ood,
                           batch_size=batch_size, positive=positive, options=options, id_split=id_split)
    return report, meta
