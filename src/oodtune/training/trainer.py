"""The one training loop behind pretraining and every fine-tuning method.

Each step draws an ID batch (and, when the loss needs them, an auxiliary-outlier batch), augments both on
the training device, runs ONE forward pass over their concatenation (as the OE / Energy reference code
does, so BatchNorm sees both), splits the outputs and hands them to a ``CompositeLoss``. SGD with Nesterov
momentum and a per-step cosine schedule (OE/Energy code: lr_t = lr·[r + (1−r)·½(1+cos(πt/T))], r = 1e-6/lr).
State is checkpointed atomically after every epoch so an interrupted run resumes where it stopped — but only with
the same settings: the run's RunMeta (dataset and the fingerprint of its content, method, loss options, base
checkpoint and its hash, architecture, ...) and TrainConfig (seed, schedule, ...) must equal the stored ones. While
training, the run folder is locked (:func:`oodtune.utils.lock.output_lock`) against a second writer. The per-epoch
history is written beside the checkpoints as ``history.csv``. An ``epoch_metrics`` hook (e.g. test and validation
accuracy) adds columns to each epoch's row; it only reports, it never changes the run.

``compile`` wraps either the model (``compile_scope="model"``) or the whole deterministic part of a step —
crop/flip with pre-drawn offsets, normalisation, forward, loss — (``"step"``) in ``torch.compile``; with
``reduce-overhead`` that becomes CUDA graphs. Random draws, the optimizer and the scheduler stay eager.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.augment import Augmentation, Params, augmentation_for
from ..data.streaming import DeviceImages
from ..data.tensors import Normalizer
from ..errors import DataError, DivergenceError, ResumeMismatchError
from ..losses.terms import CompositeLoss, LossInputs
from ..models import RunMeta, read_checkpoint, save_checkpoint, unwrap_model
from ..utils.atomic import check_writable, remove_stale_temporaries, write_csv
from ..utils.lock import output_lock
from ..utils.progress import Bar, format_rate, progress_bar
from ..utils.runtime import (
    DistInfo,
    autocast,
    channels_last_for_training,
    compile_mode,
    init_distributed,
    local_device,
    resolve_device,
    resolve_precision,
)
from .config import TrainConfig, recorded_config
from .divergence import describe_terms, diverged, first_non_finite, non_finite_weights
from .sampling import OutlierSampler, index_batches

LAST = "last.pt"
FINAL = "model.pt"
HISTORY = "history.csv"
log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StepBatch:
    """One step's inputs, drawn eagerly (:meth:`Trainer._draw`): ``x_in`` the ID images (uint8 on the device) and
    ``y_in`` their targets (a class per image; for segmentation a class per pixel, pasted objects included), the
    augmentation drawn for them, and ``x_out`` the auxiliary outlier images with their draw (None when the loss uses no
    outliers, or when the task pastes its outliers into the ID images)."""

    x_in: torch.Tensor
    y_in: torch.Tensor
    aug_in: Params | None = None
    x_out: torch.Tensor | None = None
    aug_out: Params | None = None

    @property
    def images(self) -> int:
        """Images this step feeds the network (ID and outliers)."""
        return len(self.x_in) + (0 if self.x_out is None else len(self.x_out))


@dataclass(frozen=True)
class StepOutputs:
    """What one step's forward pass returns: ``loss`` (the total, to back-propagate), ``parts`` (each term's detached
    value, for the history) and ``correct`` (ID samples classified correctly, in images: a classifier counts its
    correct images; a segmenter counts each frame of the batch as its pixel accuracy on the labelled pixels)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    correct: torch.Tensor


@dataclass
class TrainResult:
    """What a finished run reports: per-epoch history and where the final weights are."""

    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def check_run_dir(run_dir: str | Path) -> Path:
    """Refuse a finished run folder (FileExistsError) and an unwritable one (StorageError), before any work; remove
    the temporaries a killed run left there."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL).exists():
        raise FileExistsError(f"{run_dir / FINAL} already exists: this run is finished. Choose a new --out folder.")
    check_writable(run_dir, "choose another --out folder")
    remove_stale_temporaries(run_dir)
    return run_dir


def cosine_factor(step: int, total: int, lr: float, lr_min: float = 1e-6) -> float:
    """Multiplier of the base lr at ``step`` of ``total`` (OE/Energy code's cosine annealing)."""
    r = lr_min / lr
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * step / total))


def poly_factor(step: int, total: int, lr: float, power: float = 0.9, lr_min: float = 1e-8) -> float:
    """Multiplier of the base lr at ``step`` of ``total`` (PEBAL's poly decay, no warm-up):
    lr_t = lr·(1 − t/T)^power, floored at ``lr_min``."""
    return max((1 - step / total) ** power, lr_min / lr)


def lr_factor(schedule: str, step: int, total: int, lr: float) -> float:
    """Multiplier of the base lr at ``step`` of ``total`` under ``TrainConfig.lr_schedule``."""
    return poly_factor(step, total, lr) if schedule == "poly" else cosine_factor(step, total, lr)


class Trainer:
    """Trains ``net`` (a FeatureModel) on ``train_set`` with ``loss``; see module docstring. Tasks whose samples
    are not labelled images subclass it (:mod:`.segmentation`), overriding the data hooks and the step pieces."""

    def __init__(
        self,
        net: nn.Module,
        train_set: Any,
        loss: CompositeLoss,
        config: TrainConfig,
        *,
        outliers: Any = None,
        normalizer: Normalizer | None = None,
        run_dir: str | Path | None = None,
        meta: RunMeta | None = None,
        epoch_metrics: Callable[[nn.Module], Mapping[str, float]] | None = None,
    ) -> None:
        if loss.needs_outliers and outliers is None:
            raise DataError("this method needs auxiliary outliers (--outliers); none were given.")
        self._check_data(net, train_set, outliers)
        self.cfg = config
        device = resolve_device(config.device)
        self.device = local_device(device)
        self.dist: DistInfo = init_distributed(self.device)
        self.dist.check_batch(config.batch_size)
        if loss.needs_outliers:
            self.dist.check_batch(config.outlier_batch_size, "--outlier-batch-size")
        self.precision = resolve_precision(self.device, config.precision)
        self.channels_last = (channels_last_for_training(net, self.device, self.precision)
                              if config.channels_last is None else config.channels_last)
        norm = normalizer or Normalizer()
        self.normalizer = Normalizer(norm.mean, norm.std, self.channels_last, norm.bgr)
        self.loss = loss
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
        self.compile = compile_mode(config.compile, self.device, self.dist.world)
        if self.device.type == "cuda" or (self.compile != "none" and config.compile_scope == "step"):
            # A per-step finiteness check would sync the GPU every step (and split a compiled step's graph);
            # the loop checks once per epoch instead.
            loss.check_finite = False
        self.normalizer.stats(self.device)  # build the mean/std tensors now, not inside a compiled graph
        self.net = net.to(self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.use_outliers = loss.needs_outliers
        self._load_data(train_set, outliers if self.use_outliers else None)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and meta is None:
            raise TypeError("a Trainer that writes checkpoints (run_dir) needs the run's RunMeta (meta=)")
        self.meta = None if meta is None else meta.replace(
            precision=self.precision, dataset_fingerprint=train_set.fingerprint(),
            outliers_fingerprint=outliers.fingerprint() if self._outlier_count() and outliers is not None else None)
        self.train_name = train_set.name
        self.epoch_metrics = epoch_metrics

    # -- the data (overridden by tasks whose samples are not labelled images) ---------------------
    def _check_data(self, net: nn.Module, train_set: Any, outliers: Any) -> None:
        """Refuse data that does not fit the model, before anything is moved to the device."""
        if train_set.labels is None:
            raise DataError(f"{train_set.name}: training needs labels, but this set is unlabelled.")
        num_classes = getattr(net, "num_classes", 0)
        if train_set.num_classes and train_set.num_classes != num_classes:
            raise DataError(
                f"{train_set.name} has {train_set.num_classes} classes but the model outputs {num_classes}; "
                "use a checkpoint trained on the same classes."
            )
        if outliers is not None and outliers.images.shape[1:] != train_set.images.shape[1:]:
            raise DataError(
                f"outlier images are {outliers.images.shape[1:3]} but ID images are {train_set.images.shape[1:3]}; "
                "load both at the same --resolution."
            )

    def _load_data(self, train_set: Any, outliers: Any) -> None:
        """``train_x`` / ``train_y`` / ``outlier_images``: the training data on the device, resident or streamed
        (:mod:`oodtune.data.streaming`), and the augmentation for its image size (:mod:`oodtune.data.augment`)."""
        self.train_x: Any = DeviceImages(train_set.images, self.device, train_set.name)
        self.train_y = torch.from_numpy(train_set.labels).to(self.device)
        self.outlier_images: Any = (DeviceImages(outliers.images, self.device, outliers.name)
                                    if outliers is not None else None)
        self.augmentation: Augmentation = augmentation_for(int(train_set.images.shape[1]))

    def _outlier_count(self) -> int:
        """How many outliers a step's outlier sampler draws from (0: the run uses none)."""
        return 0 if self.outlier_images is None else len(self.outlier_images)

    def _prefetched(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """``batches``, with the ID images of the next one read ahead when the training set is streamed."""
        return self.train_x.prefetched(batches) if isinstance(self.train_x, DeviceImages) else batches

    # -- pieces of a step -------------------------------------------------------------------------
    # A step is split where randomness ends: ``_draw`` (eager) gathers the batch and draws its augmentation
    # from the seeded generator; ``_forward`` is pure tensor work (crop/flip, normalise, one forward pass over
    # the concatenated batch, loss), so ``--compile-scope step`` can capture all of it in one graph.
    def _draw(self, idx: torch.Tensor, gen: torch.Generator, sampler: OutlierSampler | None) -> StepBatch:
        augment = self.cfg.augment
        x_in = self.train_x[idx]
        aug_in = self.augmentation.draw(len(x_in), gen) if augment else None
        x_out = aug_out = None
        if sampler is not None and self.outlier_images is not None:
            x_out = self.outlier_images[sampler.next()]
            aug_out = self.augmentation.draw(len(x_out), gen) if augment else None
        return StepBatch(x_in, self.train_y[idx], aug_in, x_out, aug_out)

    def _prepare(self, images: torch.Tensor, aug: Params | None) -> torch.Tensor:
        return self.normalizer(images if aug is None else self.augmentation.apply(images, aug))

    def _forward(self, model: Callable[..., Any], batch: StepBatch) -> StepOutputs:
        """The loss of one batch; ``correct`` counts the correct ID predictions."""
        x = self._prepare(batch.x_in, batch.aug_in)
        if batch.x_out is not None:
            x = torch.cat([x, self._prepare(batch.x_out, batch.aug_out)])
        with autocast(self.device, self.precision):
            logits, feats = model(x)
        b = batch.x_in.shape[0]
        total, parts = self.loss(LossInputs(
            logits_in=logits[:b],
            labels_in=batch.y_in,
            features_in=feats[:b] if self.loss.needs_features else None,
            logits_out=logits[b:] if batch.x_out is not None else None,
        ))
        return StepOutputs(total, parts, (logits[:b].argmax(1) == batch.y_in).sum())

    def _step_function(self) -> Callable[[StepBatch], StepOutputs]:
        """``_forward`` bound to the (DDP-wrapped) model, compiled as ``--compile`` / ``--compile-scope`` say."""
        model: Callable[..., Any] = self.net
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.net, device_ids=ids)
        mode = None if self.compile == "default" else self.compile
        if self.compile != "none" and self.cfg.compile_scope == "model":
            model = torch.compile(model, mode=mode)

        def step(batch: StepBatch) -> StepOutputs:
            return self._forward(model, batch)

        if self.compile != "none" and self.cfg.compile_scope == "step":
            return torch.compile(step, mode=mode)
        return step

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.net.parameters(),
            lr=self.cfg.lr,
            momentum=self.cfg.momentum,
            nesterov=self.cfg.nesterov,
            weight_decay=self.cfg.weight_decay,
            fused=self.device.type == "cuda" or None,
        )

    def steps_per_epoch(self) -> int:
        n = len(self.train_x)
        steps = n // self.cfg.batch_size if n >= self.cfg.batch_size else 1
        return min(steps, self.cfg.max_steps_per_epoch or steps)

    # -- resume -----------------------------------------------------------------------------------
    def _restore(self, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                 gen: torch.Generator, sampler: OutlierSampler | None) -> tuple[int, list[dict[str, float]]]:
        if self.run_dir is None or self.meta is None or not (self.run_dir / LAST).exists():
            return 0, []
        ckpt = read_checkpoint(self.run_dir / LAST)
        state = ckpt["train_state"]
        if state is None:
            raise ResumeMismatchError(f"{self.run_dir / LAST} holds no training state; delete it to start over.")
        stored = {**ckpt["meta"].to_dict(),
                  **{f"train.{k}": v for k, v in recorded_config(state.get("config", {})).items()}}
        wanted = {**self.meta.to_dict(), **{f"train.{k}": v for k, v in asdict(self.cfg).items()}}
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        if changed:
            diff = "; ".join(f"{k}: {_short(stored.get(k))} -> {_short(wanted.get(k))}" for k in changed[:6])
            raise ResumeMismatchError(
                f"{self.run_dir / LAST} is an unfinished run with other settings ({diff}); resuming it would mix two "
                "runs. Use a new --out folder, or delete that folder to start over."
            )
        unwrap_model(self.net).load_state_dict(ckpt["model"])  # checkpoints hold the plain network's weights
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)  # dropout draws from the CUDA generator
        if sampler is not None:
            sampler.load_state_dict(state["outlier_sampler"])
        if self.dist.is_main:
            log.info("resuming %s after epoch %s", self.run_dir, state["epoch"])
        return int(state["epoch"]), list(state["history"])

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run (or resume) training; returns the history and the path of the final checkpoint."""
        with output_lock(self.run_dir) if self.run_dir is not None else nullcontext():
            if self.run_dir is not None:
                check_run_dir(self.run_dir)
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        opt = self._optimizer()
        steps = self.steps_per_epoch()
        total = steps * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(cfg.lr_schedule, t, total, cfg.lr))
        sampler = (
            OutlierSampler(self._outlier_count(), cfg.outlier_batch_size, gen, self.dist.rank, self.dist.world)
            if self._outlier_count() else None
        )
        start_epoch, history = self._restore(opt, sched, gen, sampler)
        step_fn = self._step_function()
        t_start = time.perf_counter()
        with progress_bar(f"train {self.train_name}", total=total, unit="step") as bar:
            bar.advance(steps * start_epoch)
            for epoch in range(start_epoch, cfg.epochs):
                history.append(self._epoch(step_fn, opt, sched, gen, sampler, steps, epoch, bar))
                self._save_state(epoch + 1, opt, sched, gen, history, sampler)
        result = TrainResult(history=history, seconds=time.perf_counter() - t_start)
        if self.run_dir is not None and self.meta is not None and self.dist.is_main:
            meta = self.meta.replace(train_config=asdict(cfg), history=tuple(history))
            result.checkpoint = save_checkpoint(self.run_dir / FINAL, self.net, meta)
            (self.run_dir / LAST).unlink(missing_ok=True)
        return result

    def _epoch(self, step_fn: Callable[[StepBatch], StepOutputs], opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LambdaLR, gen: torch.Generator, sampler: OutlierSampler | None,
               steps: int, epoch: int, bar: Bar) -> dict[str, float]:
        self.net.train()
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = processed = 0
        totals: list[torch.Tensor] = []  # per-step losses, inspected only if the epoch diverged
        t0 = time.perf_counter()
        batches = self._prefetched(index_batches(len(self.train_x), self.cfg.batch_size, gen, rank=self.dist.rank,
                                                 world=self.dist.world))
        for step, idx in enumerate(batches):
            if step >= steps:
                break
            batch = self._draw(idx, gen, sampler)
            if self.compile != "none":
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs are consumed
            try:
                out = step_fn(batch)
            except DivergenceError as exc:
                what = describe_terms(exc.terms) if exc.terms is not None else str(exc)
                raise self._diverged(epoch, step + 1, what) from None
            totals.append(out.loss.detach())
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            for k, v in out.parts.items():
                sums[k] = sums.get(k, 0) + v.float()
            correct += out.correct
            seen += len(idx)
            processed += batch.images * self.dist.world
            bar.advance(1)
            if step % 20 == 0:
                bar.update(rate=format_rate(processed, time.perf_counter() - t0))
        if not torch.isfinite(torch.stack(list(sums.values())).sum()):
            raise self._diverged(epoch, first_non_finite(totals), describe_terms(sums) + " (summed over the epoch)")
        bad = non_finite_weights(self.net)
        if bad:  # a finite loss whose update overflowed the weights
            raise self._diverged(epoch, len(totals), f"the weights became non-finite in this step's update ({bad[0]}"
                                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) although its loss was finite")
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "seconds": seconds}
        row.update({k: float(v) / steps for k, v in sums.items()})
        row["train_acc"] = float(correct) / max(seen, 1)
        row["images_per_s"] = processed / seconds
        if self.dist.is_main:
            measured = dict(self.epoch_metrics(self.net)) if self.epoch_metrics is not None else {}
            row.update(measured)
            parts_txt = " ".join(f"{k}={row[k]:.4f}" for k in (*sums, "train_acc", *measured))
            log.info("epoch %d/%d %s (%s, %.1fs)", epoch + 1, self.cfg.epochs, parts_txt,
                     format_rate(row["images_per_s"], 1.0), seconds)
        return row

    def _diverged(self, epoch: int, step: int, what: str) -> DivergenceError:
        return diverged(epoch, step, what, lr=self.cfg.lr, last=None if self.run_dir is None else self.run_dir / LAST)

    def _save_state(self, epoch: int, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                    gen: torch.Generator, history: list[dict[str, float]],
                    sampler: OutlierSampler | None = None) -> None:
        if self.run_dir is None or self.meta is None or not self.dist.is_main:
            return
        state = {
            "epoch": epoch,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            "history": history,
            "config": asdict(self.cfg),
            "outlier_sampler": sampler.state_dict() if sampler is not None else None,
        }
        save_checkpoint(self.run_dir / LAST, self.net, self.meta, train_state=state)
        write_csv(self.run_dir / HISTORY, history)
