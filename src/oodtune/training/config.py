"""Training settings: one dataclass, and the defaults of pretraining and fine-tuning defined once.

Every entry point (CLI options and their help, benchmark TOML files, the Python API) takes its defaults from
:data:`PRETRAIN`, :data:`FINETUNE` and (segmenters) :data:`SEGMENTATION_FINETUNE`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..utils.runtime import PRECISIONS

__all__ = ["COMPILE_MODES", "COMPILE_SCOPES", "INTEGER_FIELDS", "LEGACY_VALUES", "LR_SCHEDULES", "PASTE_MODES",
           "PRECISIONS", "TrainConfig", "PRETRAIN", "FINETUNE", "SEGMENTATION_FINETUNE", "TRAIN_KEYS",
           "recorded_config"]

COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")
COMPILE_SCOPES = ("model", "step")
#: Segmentation pasting modes: ``object`` (one object per pasted frame, scaled U(0.1, 0.5), flip 0.5) and
#: ``reference`` (PEBAL's: a photo's objects at native scale, frame flip 0.8 / scale 0.5-2 / crop; data.mixing).
PASTE_MODES = ("object", "reference")
#: Per-step learning-rate schedules: ``cosine`` (the OE / Energy code's annealing to 1e-6) and ``poly`` (PEBAL's:
#: lr·(1 − t/T)^0.9, floored at 1e-8); :func:`oodtune.training.trainer.lr_factor`.
LR_SCHEDULES = ("cosine", "poly")


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the OE/Energy-paper WRN pretraining recipe."""

    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 128
    outlier_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True
    precision: str = "auto"  # auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32
    channels_last: bool | None = None  # None = runtime.channels_last_for_training (CUDA; CPU bf16 but dilated)
    compile: str = "auto"  # auto (= reduce-overhead on CUDA, none on CPU) or a torch.compile mode; see COMPILE_MODES
    compile_scope: str = "model"  # model | step (augmentation + normalisation + forward + loss in one graph)
    device: str | None = None
    max_steps_per_epoch: int | None = None  # cap for smoke tests / CPU-scale runs
    #: segmentation: which part trains (head | decoder | all | comma-separated module names; None = head, the
    #: checkpoint's own trainable modules); see oodtune.models.segmentation
    train_part: str | None = None
    paste_mode: str = "object"  # segmentation: object | reference (PASTE_MODES)
    #: segmentation, reference pasting: probability that a frame carries pasted objects (None = PEBAL's 1/11)
    paste_share: float | None = None
    lr_schedule: str = "cosine"  # cosine | poly (LR_SCHEDULES)

    def __post_init__(self) -> None:
        for name in INTEGER_FIELDS:  # 1.7 epochs is a mistake, never silently 1
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                    value is None and name == "max_steps_per_epoch"):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.outlier_batch_size < 1:
            raise ConfigError(f"epochs, batch_size and outlier_batch_size must be >= 1: {self}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.compile not in COMPILE_MODES or self.compile_scope not in COMPILE_SCOPES:
            raise ConfigError(f"compile must be one of {COMPILE_MODES} and compile_scope one of {COMPILE_SCOPES}, "
                              f"got {self.compile!r} / {self.compile_scope!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.paste_mode not in PASTE_MODES:
            raise ConfigError(f"paste_mode must be one of {PASTE_MODES}, got {self.paste_mode!r}")
        if self.paste_share is not None and (self.paste_mode != "reference" or not 0 < self.paste_share <= 1):
            raise ConfigError(f"paste_share is the reference pasting mode's share of pasted frames, in (0, 1]; got "
                              f"{self.paste_share!r} with paste_mode {self.paste_mode!r} (use --paste-mode reference, "
                              "or --pasted-frames for the object mode).")
        if self.train_part is not None and not self.train_part.strip():
            raise ConfigError("train_part is empty; use head, decoder, all or module names (conv,classifier).")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: "not given")."""
        unknown = sorted(set(changes) - TRAIN_KEYS)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid: {', '.join(sorted(TRAIN_KEYS))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
#: Fields that take whole numbers only (a float, bool or string is refused, on every path into TrainConfig).
INTEGER_FIELDS = ("epochs", "batch_size", "outlier_batch_size", "seed", "max_steps_per_epoch")

#: Settings added after runs were first stored, with the value every run stored before them was trained with: a
#: recorded configuration that lacks one of them is read with this value (resuming and the benchmark's
#: finished-run check compare like with like instead of refusing every older run).
LEGACY_VALUES: dict[str, Any] = {"train_part": None, "paste_mode": "object", "paste_share": None,
                                 "lr_schedule": "cosine"}


def recorded_config(recorded: dict[str, Any]) -> dict[str, Any]:
    """A stored training configuration with the settings it predates filled in (:data:`LEGACY_VALUES`)."""
    return {**LEGACY_VALUES, **recorded}


#: Pretraining from scratch: the OE / Energy papers' WRN recipe (100 epochs, SGD+Nesterov, lr 0.1, cosine).
PRETRAIN = TrainConfig()
#: Fine-tuning: the Energy paper's CIFAR recipe (10 epochs, lr 1e-3, batch 128 ID + 256 outliers).
FINETUNE = TrainConfig(epochs=10, lr=1e-3)
#: Fine-tuning a segmenter: PEBAL's recipe as far as it transfers (Adam, lr 1e-5 with poly decay, batch 8, 40
#: epochs), with one frame of every batch carrying a pasted object (``outlier_batch_size``: the frames of a batch
#: that get one).
SEGMENTATION_FINETUNE = TrainConfig(epochs=40, lr=1e-5, batch_size=8, outlier_batch_size=1, weight_decay=0.0,
                                    lr_schedule="poly")
