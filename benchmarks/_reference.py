"""The reference-style training loop of the OE / Energy code, shared by the throughput and accuracy benchmarks.

What those scripts do, rebuilt with plain PyTorch: a ``DataLoader`` (shuffle, drop_last, pinned memory,
worker processes) over a Dataset that pads/crops/flips **each** uint8 image on the CPU, divides by 255 and
normalises it; ID and outlier loaders are zipped and concatenated; the batch is copied to the device; one fp32
forward pass; SGD (Nesterov momentum 0.9, weight decay 5e-4) with the per-step cosine schedule; and
``cudnn.benchmark = True``. The loss is oodtune's own (``CompositeLoss``), so only the data path and the
numerics differ from oodtune's ``Trainer``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from oodtune.data.imageset import ImageSet
from oodtune.data.tensors import CIFAR_MEAN, CIFAR_STD
from oodtune.losses.terms import CompositeLoss, LossInputs
from oodtune.models import FeatureModel
from oodtune.training.trainer import cosine_factor


class ReferenceStyleDataset(Dataset):
    """Per-image CPU pipeline as in the OE/Energy code (RandomCrop(32, padding=4), RandomHorizontalFlip,
    ToTensor, Normalize), hand-written on tensors; ``__getitem__`` returns (float CHW image, label)."""

    def __init__(self, ds: ImageSet, padding: int = 4) -> None:
        self.images = ds.images
        self.labels = ds.labels if ds.labels is not None else np.zeros(len(ds), dtype=np.int64)
        self.padding = padding
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # uint8 CHW
        _, h, w = img.shape
        p = self.padding
        padded = F.pad(img, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = padded[:, dy : dy + h, dx : dx + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        x = (img.float().div_(255) - self.mean) / self.std
        return x, int(self.labels[i])


def reference_loader(ds: ImageSet, batch_size: int, num_workers: int, device: torch.device, *,
                     generator: torch.Generator | None = None) -> DataLoader:
    """Shuffled, drop-last batches of :class:`ReferenceStyleDataset` (``generator`` seeds shuffle + workers)."""
    return DataLoader(ReferenceStyleDataset(ds), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0 and generator is None, generator=generator)


def reference_optimizer(net: nn.Module, lr: float, total_steps: int
                        ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD(lr, Nesterov 0.9, wd 5e-4) with the OE/Energy per-step cosine schedule over ``total_steps``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine_factor(t, total_steps, lr))


def reference_step(net: FeatureModel, loss: CompositeLoss, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LambdaLR, x: torch.Tensor, y: torch.Tensor,
                   x_out: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 step on ``cat([x, x_out])`` copied to ``device``; returns (total loss, ID logits), detached."""
    b = len(x)
    if x_out is not None:
        x = torch.cat([x, x_out])
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits, feats = net(x)
    total, _ = loss(LossInputs(logits[:b], y, feats[:b] if loss.needs_features else None,
                               logits[b:] if x_out is not None else None))
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    sched.step()
    return total.detach(), logits[:b].detach()
