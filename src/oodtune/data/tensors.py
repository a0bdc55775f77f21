"""Images as device tensors: uint8 NCHW transfer, per-channel normalisation, batched crop/flip augmentation.

Shared by training and evaluation (which must not depend on each other). The same code runs on CPU and CUDA:
images are decoded once, moved to the device as uint8 NCHW (4x smaller than float), and each batch is
augmented there (random crop with zero padding + horizontal flip, the standard CIFAR recipe) and normalised
with per-channel mean/std. No per-image Python work happens in a loop over batches, which is what makes the
GPU path fast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .imageset import ImageSet

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def to_device_uint8(ds: ImageSet, device: torch.device | str) -> torch.Tensor:
    """``ds.images`` (N, H, W, 3) uint8 as a contiguous (N, 3, H, W) uint8 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous().to(device)


class Normalizer:
    """x_float = (x_uint8 / 255 - mean) / std, per channel; optionally channels_last memory format, optionally
    in BGR order (``bgr``: the RGB input's channels are reversed first; ``mean``/``std`` are then in BGR order).

    The mean/std tensors are built once per device: creating them from Python lists on every batch would
    force a host-to-device copy (and a stream sync) in the hot loop.
    """

    def __init__(self, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD,
                 channels_last: bool = False, bgr: bool = False) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean/std must have 3 entries and std > 0, got mean={mean} std={std}")
        self.mean, self.std, self.channels_last, self.bgr = tuple(mean), tuple(std), channels_last, bgr
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors on ``device``, built on first use."""
        if device not in self._stats:
            shape = (1, 3, 1, 1)
            self._stats[device] = (torch.tensor(self.mean, device=device).view(shape),
                                   torch.tensor(self.std, device=device).view(shape))
        return self._stats[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats(x.device)
        if self.bgr:
            x = x.flip(1)
        out = (x.float() / 255.0 - mean) / std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


#: Per-sample crop offsets (rows, columns) and flip flags of one batch, as drawn by :func:`draw_crop_flip`.
CropFlip = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def draw_crop_flip(batch: int, generator: torch.Generator, padding: int = 4) -> CropFlip:
    """Random parameters of :func:`apply_crop_flip` for ``batch`` images, drawn from ``generator`` (whose device
    they live on): row and column offsets in [0, 2·padding], shape (B, 1), and flip flags (p=0.5), shape (B,)."""
    device = generator.device
    oy = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    return oy, ox, flip


def apply_crop_flip(x: torch.Tensor, params: CropFlip, padding: int = 4) -> torch.Tensor:
    """Crop each image of the zero-padded batch ``x`` (B, C, H, W; any dtype) back to H x W at its offsets, then
    flip the flagged ones horizontally. Pure tensor indexing, no randomness: it can sit in a compiled graph."""
    oy, ox, flip = params
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (oy + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (ox + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    cols = torch.where(flip.view(b, 1, 1, 1), cols.flip(3), cols)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    cidx = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bidx, cidx, rows, cols]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size, then a random horizontal flip (p=0.5).

    ``x`` is (B, C, H, W) of any dtype; offsets and flips are drawn from ``generator`` (which must live on
    ``x.device``) so a seed reproduces the same augmentation.
    """
    return apply_crop_flip(x, draw_crop_flip(x.shape[0], generator, padding), padding)
