"""What a checkpoint says about its model: a typed, frozen record that travels with the weights.

Like timm's ``PretrainedCfg``, :class:`RunMeta` carries everything needed to rebuild and feed a model (task,
architecture, classes, input normalisation, resolution, classification head) and what produced it (ID
dataset and its training subset, stage, method, loss options, prior, history, training configuration). On disk
it is a plain dict of JSON-like values (``to_dict``), so checkpoints still load with
``torch.load(weights_only=True)``; ``from_dict`` validates such a dict and migrates older layouts.

What defines a run is recorded so that resuming it with anything else can be refused: besides the names (dataset,
method, loss options, base checkpoint, architecture) the *content* of the training data
(``dataset_fingerprint``, ``outliers_fingerprint``: :meth:`oodtune.data.ImageSet.fingerprint`) and of the
checkpoint a fine-tuning started from (``pretrained_sha256``).

Versions: 1 = the untyped dicts written before this record existed (no ``version`` key; ``drop_rate`` and
``task`` absent in the oldest); 2 = the typed record; 3 = plus the content fingerprints, the segmentation fields
and the held-out parts of the ID data (``val_fraction``, ``test_fraction``, ``source_size``), all absent from
versions 1 and 2 (fingerprints and parts None, segmentation fields their defaults).

Segmentation checkpoints (``task="segmentation"``) have ``classes`` = the K classes the energy is computed over
and ``num_classes`` = K; the network outputs K + ``extra_channels`` maps (extra: a trained void class and/or
PEBAL's abstention channel, the last one), ``ignore_index`` is the void label of the ID data, ``channel_order``
says whether the network takes RGB or BGR input, ``input_size`` is its (width, height), ``resolution`` its height,
and ``trainable`` names the modules fine-tuning trains (the last block; the rest stays frozen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .wrn import DEFAULT_DROP_RATE

__all__ = ["CHANNEL_ORDERS", "META_VERSION", "STAGES", "TASKS", "RunMeta"]

META_VERSION = 3
TASKS = ("classification", "segmentation")
CHANNEL_ORDERS = ("rgb", "bgr")
STAGES = ("pretrain", "imported", "finetune", "scratch")


def _floats3(value: Sequence[float], name: str) -> tuple[float, float, float]:
    t = tuple(float(v) for v in value)
    if len(t) != 3:
        raise CheckpointError(f"meta {name} must have 3 entries (one per colour channel), got {list(value)}")
    return t[0], t[1], t[2]


@dataclass(frozen=True)
class RunMeta:
    """The metadata of one oodtune checkpoint (see the module docstring)."""

    arch: str  # built-in name or package.module:factory
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # input normalisation on [0, 1] pixels
    std: tuple[float, float, float]
    resolution: int
    dataset: str  # the ID dataset (name accepted by load_dataset; folder:/images: paths absolute)
    task: str = "classification"
    stage: str = "pretrain"
    head: str | None = None  # classification layer whose input is the feature vector (None: found automatically)
    drop_rate: float = DEFAULT_DROP_RATE
    data_seed: int = 0
    imbalance_ratio: float | None = None  # long-tailed training split (max/min class ratio)
    num_train: int | None = None  # seeded subsample of the training split
    # Held-out parts of the ID data, carved (stratified, seeded by data_seed) before any training and never trained
    # on: the test part of a dataset without a test split of its own, then a validation part of the train split.
    test_fraction: float | None = None
    val_fraction: float | None = None
    source_size: int | None = None  # images of the split the parts were carved from (a changed folder is refused)
    class_counts: tuple[int, ...] = ()  # training images per class
    method: str | None = None  # fine-tuning method
    pretrained: str | None = None  # checkpoint a fine-tuning started from
    pretrained_sha256: str | None = None  # SHA-256 of that checkpoint's file (None in checkpoints written before)
    outliers: str | None = None  # auxiliary outlier dataset used in training
    dataset_fingerprint: str | None = None  # content of the ID training split trained on (ImageSet.fingerprint)
    outliers_fingerprint: str | None = None  # content of the auxiliary outliers trained on
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    prior: Mapping[str, Any] | None = None  # OutlierPrior.to_dict() of Balanced Energy
    weights: str | None = None  # source file of an imported model
    train_config: Mapping[str, Any] | None = None  # TrainConfig as a dict, once training finished
    precision: str | None = None  # what training ran in (fp32 / bf16 autocast), --precision resolved on its device
    history: tuple[Mapping[str, float], ...] = ()  # one row per finished epoch
    notes: Mapping[str, str] = field(default_factory=dict)  # free-form provenance, e.g. which training loop
    # segmentation (see the module docstring)
    extra_channels: int = 0  # outputs after the K class logits (void / abstention; the last one abstains)
    ignore_index: int | None = None  # void label of the ID data
    channel_order: str = "rgb"  # the network's input channel order
    input_size: tuple[int, int] | None = None  # (width, height) of the network's input
    trainable: tuple[str, ...] = ()  # modules fine-tuning trains (empty: all)
    version: int = META_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CheckpointError(f"unknown task {self.task!r} in checkpoint meta; this oodtune knows {TASKS}.")
        if self.stage not in STAGES:
            raise CheckpointError(f"unknown stage {self.stage!r} in checkpoint meta; expected one of {STAGES}.")
        if self.num_classes != len(self.classes):
            raise CheckpointError(f"meta says {self.num_classes} classes but lists {len(self.classes)} class names.")
        if self.channel_order not in CHANNEL_ORDERS:
            raise CheckpointError(f"unknown channel order {self.channel_order!r}; expected one of {CHANNEL_ORDERS}.")
        if self.extra_channels < 0:
            raise CheckpointError(f"extra_channels must be >= 0, got {self.extra_channels}.")
        for name in ("classes", "class_counts", "history", "trainable"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 2 or min(size) < 1:
                raise CheckpointError(f"input_size must be (width, height), got {list(self.input_size)}.")
            object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", _floats3(self.mean, "mean"))
        object.__setattr__(self, "std", _floats3(self.std, "std"))

    def replace(self, **changes: Any) -> RunMeta:
        """A copy with ``changes`` applied (the record itself is immutable)."""
        return dataclasses.replace(self, **changes)

    @property
    def seconds_trained(self) -> float:
        """Wall time of the recorded training epochs."""
        return float(sum(float(h["seconds"]) for h in self.history))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON-like values (lists, not tuples), as stored in a checkpoint."""
        out = dataclasses.asdict(self)
        for name in ("classes", "mean", "std", "class_counts", "history", "trainable"):
            out[name] = list(out[name])
        out["input_size"] = None if self.input_size is None else list(self.input_size)
        out["loss_options"] = dict(self.loss_options)
        out["notes"] = dict(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunMeta:
        """Validate a stored dict and migrate older layouts (module docstring)."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"checkpoint meta must be a dict, got {type(data).__name__}")
        d = dict(data)
        version = int(d.pop("version", 1))
        if version > META_VERSION:
            raise CheckpointError(f"checkpoint meta version {version} is newer than this oodtune understands "
                                  f"({META_VERSION}); upgrade oodtune.")
        if version == 1 and "loop" in d:  # benchmarks/reference_train.py recorded its loop at the top level
            d["notes"] = {"loop": str(d.pop("loop"))}
        if version == 1 and d.get("stage") == "reference-pretrain":  # ... and a stage of its own
            d["stage"] = "pretrain"
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise CheckpointError(f"checkpoint meta lacks {missing}; it is not a complete oodtune checkpoint.")
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"checkpoint meta has unknown keys {unknown}; it was written by another program "
                                  "or a newer oodtune.")
        if d.get("drop_rate") is None:
            d.pop("drop_rate", None)
        d["loss_options"] = dict(d.get("loss_options") or {})
        d["notes"] = dict(d.get("notes") or {})
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid checkpoint meta: {exc}") from exc
