"""A fast-training CIFAR network in the style of Keller Jordan's airbench ("94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv:2404.00498), written for oodtune: ``airnet`` (base width 64) and ``airnet-W``.

Architecture (8 weight layers, ~1.97 M parameters at width 64)::

    2x2 conv, 3 -> 24 channels, no padding (32 -> 31 pixels), bias; GELU      the "whitening" stem
    3 x block(c_in -> c_out):  3x3 conv -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU
        widths W, 4W, 4W (64, 256, 256)                                       31 -> 15 -> 7 -> 3 pixels
    3x3 max-pool -> flatten -> features g(x) (4W) ; logits = head(g(x) / 9)   head: Linear without bias

What makes it train in few epochs (paper, Sec. 3): BatchNorm without a learnable scale (its weight is fixed at
1, only the bias learns); every 3x3 convolution starts as a partial identity (Dirac on its first
``min(c_in, c_out)`` output channels), so the untrained network is close to a shallow one; the logits are scaled
down by 1/9; the stem can be initialised from the data as a patch-whitening layer
(:meth:`AirNet.whiten`: the eigenvectors of the 2x2 patch covariance, scaled by 1/sqrt(eigenvalue + eps),
with their negatives — 12 + 12 filters; the paper then freezes it). About 0.12 GMAC per 32x32 image (WRN-40-2:
0.33; ResNet-18: 0.56).

Training recipe parts of airbench that oodtune's trainer does not implement (label smoothing 0.2, lookahead /
EMA of the weights, the triangular learning-rate schedule with 64x lr on BatchNorm biases, alternating flips,
multi-crop test-time augmentation) are listed as deviations in ``docs/cpu-base.md``; the network alone, with
oodtune's SGD + cosine recipe, is what ``arch = "airnet"`` trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AirNet", "airnet_width"]

STEM = 24  # 2 * 3 * 2 * 2: the 12 whitening filters of 2x2 RGB patches and their negatives
LOGIT_SCALE = 1.0 / 9.0


def airnet_width(name: str) -> int | None:
    """The base width of an ``airnet`` / ``airnet-W`` name, None for other names."""
    if name == "airnet":
        return 64
    if name.startswith("airnet-") and name[7:].isdigit() and int(name[7:]) >= 1:
        return int(name[7:])
    return None


class _Norm(nn.BatchNorm2d):
    """BatchNorm whose scale is fixed at 1 (only the bias learns)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv(c_in, c_out), _Norm(c_out)
        self.conv2, self.norm2 = _conv(c_out, c_out), _Norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """The network of the module docstring; ``forward_features`` gives g(x), ``head`` the final layer."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, STEM, 2, padding=0, bias=True)
        with torch.no_grad():
            self.stem.bias.zero_()  # type: ignore[union-attr]
        self.blocks = nn.Sequential(_Block(STEM, width), _Block(width, 4 * width), _Block(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.stem(x)))
        return torch.flatten(F.max_pool2d(x, 3), 1) * LOGIT_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Initialise the stem from normalised training images (N, 3, H, W) as a patch-whitening layer: filters
        v_i / sqrt(λ_i + eps) and their negatives, (λ_i, v_i) the eigenpairs of the covariance of all 2x2 patches
        (largest first). Its outputs are then decorrelated with unit variance on those images."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, 3, H-1, W-1, 2, 2
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat))
        order = torch.argsort(eigenvalues, descending=True)
        filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + eps)).T.reshape(12, 3, 2, 2)
        self.stem.weight.copy_(torch.cat([filters, -filters]))
