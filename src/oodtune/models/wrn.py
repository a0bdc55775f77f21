"""Wide Residual Networks (Zagoruyko & Komodakis, 2016) in the CIFAR form used by the OE and Energy papers.

WRN-d-k: depth d = 6n + 4 (n pre-activation basic blocks per group), widths 16k/32k/64k, dropout between
the two convolutions of each block (0.3 in the OE/Energy WRN-40-2 experiments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, y = x · m / (1 − p) with m ~ Bernoulli(1 − p). Under CPU bf16 autocast the mask is
    ``rand >= p`` (same distribution, a different random stream): ``bernoulli_``, which ``F.dropout`` uses, was a
    quarter of a WRN-16-1 bf16 training step on a CPU, ``rand`` is about 3x faster. Elsewhere ``F.dropout``, so
    fp32 and CUDA runs draw exactly what they drew before."""
    if not training or p == 0:
        return x
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        keep = torch.rand_like(x, dtype=torch.float32) >= p
        return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype))
    return F.dropout(x, p=p, training=True)


class _Block(nn.Module):
    """BN-ReLU-conv3x3 -> dropout -> BN-ReLU-conv3x3, plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = dropout(out, self.drop_rate, self.training)
        out = self.conv2(out)
        # As in the reference WRN: the projection shortcut sees the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


#: Dropout between the two convolutions of a block, as in the OE / Energy WRN-40-2 experiments.
DEFAULT_DROP_RATE = 0.3


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs; ``forward_features`` returns the 64k-dim pooled features."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10,
                 drop_rate: float = DEFAULT_DROP_RATE) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ModelError(f"WRN depth must be 6n+4 (e.g. 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                _Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3])
        self.head = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.groups(self.conv1(x))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
