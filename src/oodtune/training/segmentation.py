"""Fine-tuning a segmentation network with pasted outlier objects (PEBAL's protocol), on the shared training loop.

Each step draws ``batch_size`` frames of the ID training split; when the loss uses outliers, one object of the
object bank is pasted into each of the first ``outlier_batch_size`` frames (random scale, flip and position,
:func:`oodtune.data.objects.paste_object`; its pixels get :data:`~oodtune.losses.pixel.OUTLIER_LABEL`); every
frame is flipped horizontally with probability 0.5. All draws come from the run's seeded generator, so a seed
reproduces the batches and a resumed run continues them. One forward pass over the batch; the loss sees the
labelled pixels and the outlier pixels as rows and the whole batch as maps (:mod:`oodtune.losses.pixel`).

Only the checkpoint's ``trainable`` modules are optimised (the others are frozen, BatchNorm included: see
:class:`~oodtune.models.SegmentationModel`), with Adam as in the reference (PEBAL: Adam, lr 1e-5, poly decay
(1 − t/T)^0.9 per step, the default ``lr_schedule`` here) and ``weight_decay`` as Adam's L2 term.

Reference protocol vs this loop: PEBAL builds each epoch from all Cityscapes frames plus 10% as many frames with
a COCO object pasted (so about one sample in eleven carries an outlier, and a batch may carry none) and rescales
and crops the whole mixed frame; here a fixed number of frames per batch carry an object (``outlier_batch_size``)
and the object alone is rescaled. ``paste_mode = "reference"`` reproduces the reference instead
(:mod:`oodtune.data.mixing`): each frame carries the objects of one photo with probability ``paste_share``
(default 1/11; at most ``outlier_batch_size`` frames per batch: set it to ``batch_size`` for the reference), at
their native scale relative to the frame, and every frame is flipped with probability 0.8, rescaled by 0.5-2 and
cropped back to its size (void labels where the scaled frame is smaller).

Last-block fine-tuning (the model :attr:`~oodtune.models.SegmentationModel.splits` into a frozen trunk and the
trainable tail, one process, no ``--compile``) caches the trunk's output of the frames without a pasted object on
disk (:mod:`.trunk_cache`; ``OODTUNE_TRUNK_CACHE=0`` turns it off): those frames run the tail only, the pasted
ones the whole network. The tail sees the same batch as without the cache, so its BatchNorm statistics and the
losses are the same up to the cache's bf16 / fp16 rounding.

``train_part`` (head / decoder / all / module names) chooses the trainable modules before the optimiser is built
(:func:`oodtune.models.segmentation.resolve_train_part`, BatchNorm policy there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.mixing import REFERENCE_SHARE, paste_native, reference_augment, reference_object_scale
from ..data.objects import ObjectBank, paste_objects
from ..data.segmentation import SegmentationSet
from ..errors import ConfigError, DataError
from ..functional import channel_argmax
from ..losses.pixel import OUTLIER_LABEL
from ..losses.terms import CrossEntropy, LossInputs
from ..models import SegmentationModel
from ..utils.runtime import autocast
from .sampling import OutlierSampler
from .trainer import StepBatch, StepOutputs, Trainer
from .trunk_cache import TrunkCache, cache_enabled, trunk_key

__all__ = ["SegmentationTrainer"]


@dataclass(frozen=True)
class FrameBatch(StepBatch):
    """A segmentation step's frames with what the trunk cache needs: each frame's index in the training set and
    its flip (the pasted frames come first, ``pasted`` of them)."""

    frames: tuple[int, ...] = ()
    flips: tuple[bool, ...] = ()
    pasted: int = 0


class SegmentationTrainer(Trainer):
    """:class:`~oodtune.training.trainer.Trainer` for a :class:`SegmentationModel` on a :class:`SegmentationSet`
    with an :class:`ObjectBank` of outliers (module docstring)."""

    net: SegmentationModel

    def _check_data(self, net: nn.Module, train_set: Any, outliers: Any) -> None:
        if not isinstance(net, SegmentationModel):
            raise TypeError("SegmentationTrainer trains a SegmentationModel")
        if not isinstance(train_set, SegmentationSet) or train_set.is_anomaly_set:
            raise DataError(f"{getattr(train_set, 'name', train_set)}: segmentation fine-tuning needs an ID "
                            "segmentation set (frames with class label maps).")
        if train_set.num_classes != net.num_classes:
            raise DataError(f"{train_set.name} has {train_set.num_classes} classes but the model has "
                            f"{net.num_classes} class outputs; fine-tune on the data set the checkpoint was made for.")
        if outliers is not None and not isinstance(outliers, ObjectBank):
            raise DataError("segmentation fine-tuning pastes objects from an object bank (--outliers coco-objects).")

    def _load_data(self, train_set: Any, outliers: Any) -> None:
        # Frames stay on the CPU (objects are pasted there); each batch is moved to the device.
        self.train_x = torch.from_numpy(np.ascontiguousarray(train_set.images))  # (N, H, W, 3) uint8
        self.train_y = torch.from_numpy(np.ascontiguousarray(train_set.labels))  # (N, H, W) uint8
        self.objects: ObjectBank | None = outliers
        self.ignore_index = train_set.ignore_index
        #: frames of each batch that get a pasted object (the config's outlier_batch_size: one object per frame)
        self.pasted_frames = self.cfg.outlier_batch_size if outliers is not None else 0
        if self.pasted_frames > self.cfg.batch_size:
            raise ConfigError(f"outlier_batch_size {self.pasted_frames} is the number of frames per batch that get a "
                              f"pasted object (--pasted-frames); it cannot exceed batch_size {self.cfg.batch_size}.")
        self.reference = self.cfg.paste_mode == "reference"
        if self.reference:
            if self.ignore_index is None:
                raise DataError(f"{train_set.name} has no void label, but the reference pasting mode pads frames "
                                "it scales down with void labels; use --paste-mode object.")
            #: the photos the reference mode draws from: every object of a photo is pasted together
            self.photo_groups = outliers.photo_groups() if outliers is not None else ()
            self.object_scale = reference_object_scale(train_set.size)
            mean = self.normalizer.mean[::-1] if self.normalizer.bgr else self.normalizer.mean
            self.fill = tuple(int(round(255 * m)) for m in mean)  # padding = the mean colour (0 after normalising)
        # reference pasting rescales and crops every frame: no frame's trunk output repeats, nothing to cache
        self.trunk_cache = self._make_cache(train_set) if cache_enabled() and not self.reference else None

    def _make_cache(self, train_set: SegmentationSet) -> TrunkCache | None:
        """The trunk cache of this network and training set, when the network splits and the step is eager."""
        if not self.net.splits or self.compile != "none" or self.dist.world > 1:
            return None
        trainable = tuple(f"model.{name}." for name in self.net.trainable)
        frozen = {k: v for k, v in self.net.state_dict().items() if not k.startswith(trainable)}
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        norm = self.normalizer
        key = trunk_key(frozen, train_set.fingerprint(), tuple(train_set.images.shape[1:3]), norm.mean, norm.std,
                        norm.bgr, dtype)
        return TrunkCache(key, len(train_set.images), dtype)

    def _outlier_count(self) -> int:
        if self.objects is None:
            return 0
        return len(self.photo_groups) if self.reference else len(self.objects)

    def _draw(self, idx: torch.Tensor, gen: torch.Generator, sampler: OutlierSampler | None) -> StepBatch:
        rows = idx.cpu()
        frames = self.train_x[rows].numpy().copy()
        labels = self.train_y[rows].numpy().copy()
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))
        if self.reference:  # every frame rescaled and cropped: nothing for the trunk cache
            frames, labels = self._reference_mix(frames, labels, rng, sampler)
            return StepBatch(*self._tensors(frames, labels))
        if sampler is not None and self.objects is not None:  # the sampler draws pasted_frames objects
            paste_objects(frames, labels, self.objects, rng, OUTLIER_LABEL, objects=sampler.next().cpu().tolist())
        flip = rng.random(len(frames)) < 0.5
        frames[flip] = frames[flip, :, ::-1]
        labels[flip] = labels[flip, :, ::-1]
        x, y = self._tensors(frames, labels)
        pasted = self.pasted_frames if sampler is not None and self.objects is not None else 0
        # the outliers are pasted into the frames: no separate outlier images
        return FrameBatch(x, y, frames=tuple(rows.tolist()), flips=tuple(flip.tolist()), pasted=pasted)

    def _logits(self, model: Callable[..., Any], batch: StepBatch) -> torch.Tensor:
        """The network's logits for the batch's frames; with a trunk cache the unpasted frames' trunk output comes
        from the cache (computed and stored the first time a frame is seen with that flip)."""
        x = batch.x_in
        cache = self.trunk_cache
        if cache is None or not isinstance(batch, FrameBatch) or batch.pasted >= len(batch.frames):
            with autocast(self.device, self.precision):
                return model(self.normalizer(x))
        pasted = batch.pasted

        def trunk(rows: slice | list[int]) -> torch.Tensor:
            with torch.no_grad(), autocast(self.device, self.precision):
                return self.net.trunk(self.normalizer(x[rows]))

        cached = cache.get(list(batch.frames[pasted:]), list(batch.flips[pasted:]),
                           lambda rows: trunk([pasted + r for r in rows]), self.device)
        feats = torch.cat([trunk(slice(0, pasted)).float(), cached.float()]) if pasted else cached
        return self.net.tail(feats, x.shape[-2:])

    def _tensors(self, frames: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) uint8 frames and (N, H, W) int64 labels on the device."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().to(self.device)
        return x, torch.from_numpy(labels).to(self.device, torch.int64)

    def _reference_mix(self, frames: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                       sampler: OutlierSampler | None) -> tuple[np.ndarray, np.ndarray]:
        """The reference pasting mode (module docstring): photos pasted into a ``paste_share`` of the frames (at most
        the sampler's photos per batch), then every frame flipped / rescaled / cropped."""
        share = REFERENCE_SHARE if self.cfg.paste_share is None else self.cfg.paste_share
        pasted = np.flatnonzero(rng.random(len(frames)) < share)
        if sampler is not None and self.objects is not None and len(pasted):
            bank = self.objects
            for i, photo in zip(pasted, sampler.next().cpu().tolist(), strict=False):
                group = self.photo_groups[int(photo)]
                paste_native(frames[i], labels[i], [bank.images[k] for k in group], [bank.masks[k] for k in group],
                             [self.object_scale / bank.storage_scale(k) for k in group], rng, OUTLIER_LABEL)
        out = [reference_augment(f, y, rng, fill=self.fill, void=int(self.ignore_index or 0))
               for f, y in zip(frames, labels, strict=True)]
        return np.stack([f for f, _ in out]), np.stack([y for _, y in out])

    def _forward(self, model: Callable[..., Any], batch: StepBatch) -> StepOutputs:
        """The loss of one batch; ``correct`` is the pixel accuracy on the labelled pixels × the frames."""
        x_in, y_in = batch.x_in, batch.y_in
        logits = self._logits(model, batch)
        k = self.net.num_classes
        classes = logits[:, :k]  # one slice for the rows and the energy map: its backward allocates once
        pixels = classes.permute(0, 2, 3, 1)
        outlier = y_in == OUTLIER_LABEL
        labelled = ~outlier if self.ignore_index is None else ~outlier & (y_in != self.ignore_index)
        # the energy map once, for every term that needs it (all but plain cross-entropy)
        energy_map = (-torch.logsumexp(classes.float(), dim=1)
                      if any(not isinstance(t, CrossEntropy) for t in self.loss.terms) else None)
        total, parts = self.loss(LossInputs(
            logits_in=pixels[labelled], labels_in=y_in[labelled],
            logits_out=pixels[outlier] if self.use_outliers else None, logits_map=logits, labels_map=y_in,
            energy_map=energy_map, energy_in=None if energy_map is None else energy_map[labelled],
        ))
        accuracy = (channel_argmax(logits) == y_in)[labelled].float().mean()
        return StepOutputs(total, parts, accuracy * x_in.shape[0])

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.net.trainable_parameters()), lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
