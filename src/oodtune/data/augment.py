"""Training augmentation on the device, chosen by image size: pad-crop + flip for small images, random-resized crop +
flip for large ones.

* Below :data:`RESIZED_CROP_FROM` px: the CIFAR recipe (4-px zero padding, random crop, flip;
  :func:`oodtune.data.tensors.apply_crop_flip`).
* From :data:`RESIZED_CROP_FROM` px on: torchvision's ImageNet recipe (``RandomResizedCrop(scale=(0.08, 1),
  ratio=(3/4, 4/3))`` + ``RandomHorizontalFlip``). Per image, a box of area ``s·H·W`` (s ~ U(0.08, 1)) and aspect
  ratio ``r`` (log r ~ U(log 3/4, log 4/3)), ``w = sqrt(s·H·W·r)``, ``h = sqrt(s·H·W/r)``, is drawn up to ten times
  until it fits the image, at a uniform position; if none fits, the whole image, its ratio clamped to the range, is
  centre-cropped (torchvision's fallback). The box is resampled bilinearly back to H x W (one batched
  ``grid_sample``, the flip folded into the same affine map).

Both split into ``draw`` (random parameters from the run's seeded generator, eager) and ``apply`` (pure tensor
work, can sit inside a compiled step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tensors import apply_crop_flip, draw_crop_flip

__all__ = ["RESIZED_CROP_FROM", "Augmentation", "apply_resized_crop_flip", "augmentation_for",
           "draw_resized_crop_flip"]

#: Images of at least this many pixels a side get the random-resized crop.
RESIZED_CROP_FROM = 128
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_TRIES = 10

#: Random parameters of one batch's augmentation.
Params = tuple[torch.Tensor, ...]


def draw_resized_crop_flip(batch: int, size: tuple[int, int], generator: torch.Generator) -> Params:
    """Boxes (B, 4) as (top, left, height, width) in pixels of images of ``size`` = (H, W), and flip flags (B,)
    (module docstring), drawn from ``generator``."""
    device = generator.device
    height, width = size
    area = height * width
    target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(batch, _TRIES, device=device, generator=generator))
    log_r = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * torch.rand(
        batch, _TRIES, device=device, generator=generator)
    ratio = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first try that fits (0 when none does)
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # fallback: the whole image, ratio clamped to RATIO, centred
    in_ratio = width / height
    fw = float(width) if RATIO[0] <= in_ratio <= RATIO[1] else (
        float(round(height * RATIO[0])) if in_ratio < RATIO[0] else float(round(height * RATIO[1])))
    fh = float(height) if RATIO[0] <= in_ratio <= RATIO[1] else (
        float(round(width / RATIO[0])) if in_ratio < RATIO[0] else float(round(width / RATIO[1])))
    fw, fh = min(fw, width), min(fh, height)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    u = torch.rand(batch, 2, device=device, generator=generator)
    top = torch.where(ok, torch.floor(u[:, 0] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    left = torch.where(ok, torch.floor(u[:, 1] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    return torch.stack([top, left, h, w], dim=1), flip


def apply_resized_crop_flip(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W; any dtype) cropped to its box, resized bilinearly to H x W and flipped where
    flagged; float output in the input's value range."""
    boxes, flip = params
    b, _, height, width = x.shape
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    # affine map from output coordinates in [-1, 1] to input coordinates (align_corners=False convention)
    sx, sy = w / width, h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [b, x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Augmentation:
    """One recipe: ``draw(batch, generator)`` -> parameters, ``apply(x, parameters)`` -> augmented batch."""

    name: str
    draw: Callable[[int, torch.Generator], Params]
    apply: Callable[[torch.Tensor, Params], torch.Tensor]


def augmentation_for(resolution: int) -> Augmentation:
    """The recipe for square images of ``resolution`` px (module docstring)."""
    if resolution >= RESIZED_CROP_FROM:
        return Augmentation("random-resized-crop+flip",
                            lambda n, gen: draw_resized_crop_flip(n, (resolution, resolution), gen),
                            apply_resized_crop_flip)
    return Augmentation("pad-crop+flip", draw_crop_flip, apply_crop_flip)  # type: ignore[arg-type]
