"""ESPNet (Mehta et al., "ESPNet: Efficient Spatial Pyramid of Dilated Convolutions for Semantic Segmentation",
ECCV 2018), p=2, q=8, written so that the weights its authors published load strictly.

Encoder (ESPNet-C): a strided 3x3 CBR (16 ch, 1/2), concatenated with the image average-pooled to 1/2 (19 ch);
an ESP down-sampler to 64 ch at 1/4 followed by ``p`` ESP blocks, concatenated with the 1/4 down-sampler output
and the image at 1/4 (131 ch); an ESP down-sampler to 128 ch at 1/8 followed by ``q`` ESP blocks, concatenated
with the 1/8 down-sampler output (256 ch); a 1x1 projection to K channels. An ESP block reduces with a 1x1
convolution to n = out/5 channels, transforms with five parallel 3x3 convolutions of dilation 1, 2, 4, 8, 16, adds
them hierarchically (d2, d2+d4, d2+d4+d8, ...; the paper's de-gridding) and concatenates, plus a residual.

Decoder (the paper's ESPNet): the 1/8 prediction is batch-normalised and up-sampled 2x (transposed convolution),
concatenated with a K-channel projection of the 131-channel 1/4 features, refined by BN-PReLU and an ESP block
and up-sampled again (1/2), concatenated with level-1 features, fused by a 3x3 CBR and up-sampled to the input
size by a final 2x transposed convolution (``classifier``). Two variants exist among the published weights:

* ``espnet`` — the level-1 features are the 16 convolution channels (the authors' ``test/Model.py``; their
  Cityscapes weights, ``conv`` takes 16 + K channels);
* ``espnet-camvid`` — the level-1 features are the 19 channels of the convolution *and* the 1/2 input projection
  (the authors' ``train/Model.py``; their CamVid weights, ``conv`` takes 19 + K channels).

Module names follow the published state_dicts (``encoder.level2_0.d16.conv.weight``, ``up_l2.1.bn.bias``, ...),
so ``load_state_dict(strict=True)`` checks every tensor. Inputs must have a height and width divisible by 8.
Both published models take **BGR** input standardised per channel on the 0..255 scale and *then* divided by 255
(see :data:`ESPNET_PREPROCESSING`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["ESPNET_ARCHS", "ESPNET_PREPROCESSING", "ESPNet", "build_espnet"]


class _CBR(nn.Module):
    """k x k convolution (no bias), BatchNorm (eps 1e-3), PReLU."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _BR(nn.Module):
    """BatchNorm (eps 1e-3) then PReLU."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=1e-3)
        self.act = nn.PReLU(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class _Conv(nn.Module):
    """A bias-free k x k convolution with 'same' padding for its dilation (the published ``C``/``CDilated``)."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2 * dilation, bias=False,
                              dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ESP(nn.Module):
    """Reduce (1x1, or a strided 3x3 when down-sampling) -> five dilated 3x3 branches -> hierarchical sums ->
    concatenation (-> + input) -> BN-PReLU. ``down``: the down-sampling block, whose BN/PReLU are direct children
    (``bn``, ``act``) in the published weights; the other blocks hold them as ``bn`` = BR."""

    def __init__(self, n_in: int, n_out: int, *, down: bool = False, residual: bool = True) -> None:
        super().__init__()
        n = n_out // 5
        self.c1 = _Conv(n_in, n, 3, stride=2) if down else _Conv(n_in, n, 1)
        self.d1 = _Conv(n, n_out - 4 * n, 3, dilation=1)
        self.d2 = _Conv(n, n, 3, dilation=2)
        self.d4 = _Conv(n, n, 3, dilation=4)
        self.d8 = _Conv(n, n, 3, dilation=8)
        self.d16 = _Conv(n, n, 3, dilation=16)
        self.down = down
        self.residual = residual and not down
        if down:
            self.bn: nn.Module = nn.BatchNorm2d(n_out, eps=1e-3)
            self.act: nn.Module = nn.PReLU(n_out)
        else:
            self.bn = _BR(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.c1(x)
        s2 = self.d2(r)
        s4 = s2 + self.d4(r)
        s8 = s4 + self.d8(r)
        s16 = s8 + self.d16(r)
        out = torch.cat([self.d1(r), s2, s4, s8, s16], 1)
        if self.residual:
            out = out + x
        return self.act(self.bn(out)) if self.down else self.bn(out)


class _InputProjection(nn.Module):
    """The image average-pooled (3x3, stride 2) ``times`` times."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


class _Encoder(nn.Module):
    """ESPNet-C (see the module docstring); ``forward`` returns the level-1, level-2 and 1/8 features."""

    def __init__(self, num_classes: int, p: int, q: int) -> None:
        super().__init__()
        self.level1 = _CBR(3, 16, 3, 2)
        self.sample1 = _InputProjection(1)
        self.sample2 = _InputProjection(2)
        self.b1 = _BR(16 + 3)
        self.level2_0 = _ESP(16 + 3, 64, down=True)
        self.level2 = nn.ModuleList(_ESP(64, 64) for _ in range(p))
        self.b2 = _BR(128 + 3)
        self.level3_0 = _ESP(128 + 3, 128, down=True)
        self.level3 = nn.ModuleList(_ESP(128, 128) for _ in range(q))
        self.b3 = _BR(256)
        self.classifier = _Conv(256, num_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level-1 conv features (16 ch, 1/2), level-1 with input projection (19 ch), level-2 (131 ch, 1/4),
        K-channel 1/8 prediction)."""
        l1 = self.level1(x)
        l1_cat = self.b1(torch.cat([l1, self.sample1(x)], 1))
        l2_0 = self.level2_0(l1_cat)
        l2 = l2_0
        for block in self.level2:
            l2 = block(l2)
        l2_cat = self.b2(torch.cat([l2, l2_0, self.sample2(x)], 1))
        l3_0 = self.level3_0(l2_cat)
        l3 = l3_0
        for block in self.level3:
            l3 = block(l3)
        l3_cat = self.b3(torch.cat([l3_0, l3], 1))
        return l1, l1_cat, l2_cat, self.classifier(l3_cat)


def _up2(channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(channels, channels, 2, stride=2, padding=0, output_padding=0, bias=False)


class ESPNet(nn.Module):
    """ESPNet with its light-weight decoder; ``forward(x)`` gives (B, num_classes, H, W) logits.

    ``level1_with_projection`` selects the decoder variant (module docstring): False for the published
    Cityscapes weights (``espnet``), True for the CamVid weights (``espnet-camvid``).
    """

    def __init__(self, num_classes: int, p: int = 2, q: int = 8, *, level1_with_projection: bool = False) -> None:
        super().__init__()
        k = num_classes
        self.encoder = _Encoder(k, p, q)
        self.level3_C = _Conv(128 + 3, k, 1)
        self.br = nn.BatchNorm2d(k, eps=1e-3)
        self.level1_with_projection = level1_with_projection
        self.conv = _CBR((19 if level1_with_projection else 16) + k, k, 3, 1)
        self.up_l3 = nn.Sequential(_up2(k))
        self.combine_l2_l3 = nn.Sequential(_BR(2 * k), _ESP(2 * k, k, residual=False))
        self.up_l2 = nn.Sequential(_up2(k), _BR(k))
        self.classifier = _up2(k)

    #: The decoder's last block, which fine-tuning trains: ``forward(x) == forward_tail(forward_trunk(x))``.
    tail_modules = ("conv", "classifier")

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before :attr:`tail_modules`: the decoder's fused 1/2-resolution features (K + 16 or 19 ch)."""
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ModelError(f"ESPNet needs a height and width divisible by 8, got {tuple(x.shape[-2:])}; resize the "
                             "input (e.g. --input-size 480x360).")
        l1, l1_cat, l2_cat, l3_pred = self.encoder(x)
        up3 = self.up_l3(self.br(l3_pred))
        up2 = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(l2_cat), up3], 1)))
        return torch.cat([up2, l1_cat if self.level1_with_projection else l1], 1)

    def forward_tail(self, trunk: torch.Tensor) -> torch.Tensor:
        """The last block on :meth:`forward_trunk`'s output: (B, K, H, W) logits."""
        return self.classifier(self.conv(trunk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.forward_trunk(x))


#: Built-in architecture name -> decoder variant (``level1_with_projection``).
ESPNET_ARCHS = {"espnet": False, "espnet-camvid": True}

#: Input preprocessing of the published weights, in the network's channel order (BGR), as oodtune's
#: ``(x/255 - mean) / std`` on [0, 1] pixels: the authors compute ((x - m) / s) / 255 on 0..255 pixels, which is
#: (x/255 - m/255) / s, so ``mean = m/255`` and ``std = s`` (0..255 units). CamVid statistics: the authors'
#: training loader's per-image BGR mean/std averaged over the 367 train frames (they are not in the repository;
#: recomputed, see the data README); Cityscapes: the values in the authors' ``test/VisualizeResults.py``.
ESPNET_PREPROCESSING: dict[str, dict[str, tuple[float, float, float]]] = {
    "espnet-camvid": {"mean": (110.331024 / 255, 108.40887 / 255, 105.033195 / 255),
                      "std": (72.12571, 72.69074, 69.90435)},
    "espnet": {"mean": (72.3923111 / 255, 82.90893555 / 255, 73.15840149 / 255),
               "std": (45.3192215, 46.15289307, 44.91483307)},
}


def build_espnet(arch: str, num_classes: int) -> ESPNet:
    """``espnet`` or ``espnet-camvid`` (p=2, q=8) with ``num_classes`` output channels."""
    if arch not in ESPNET_ARCHS:
        raise ModelError(f"unknown ESPNet variant {arch!r}; use one of {', '.join(ESPNET_ARCHS)}")
    return ESPNet(num_classes, 2, 8, level1_with_projection=ESPNET_ARCHS[arch])
