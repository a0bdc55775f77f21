"""Architectures by name: the built-in zoo (WRN-d-k, CIFAR ResNet-18, the fast-training AirNet; the segmenters
ESPNet / ESPNet-CamVid) and user architectures by import path."""

from __future__ import annotations

import re

from torch import nn

from ..errors import ModelError
from .airnet import AirNet, airnet_width
from .espnet import ESPNET_ARCHS, build_espnet
from .imported import build_imported, is_import_path
from .resnet import ResNet18
from .wrn import DEFAULT_DROP_RATE, WideResNet

__all__ = ["ARCHITECTURES", "DEFAULT_DROP_RATE", "MAX_PARAMETERS", "build_model", "wrn_parameters"]

ARCHITECTURES = ("wrn-40-2", "wrn-16-2", "wrn-28-10", "resnet18", "airnet", *ESPNET_ARCHS)
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")
#: Largest network built by name: 2**30 parameters (4 GiB of fp32 weights; WRN-28-10 has 36.5 M).
MAX_PARAMETERS = 2**30


def wrn_parameters(depth: int, width: int, num_classes: int) -> int:
    """Parameter count of :class:`WideResNet` ``(depth, width, num_classes)``, computed without building it:
    n = (depth-4)/6 blocks per group of widths 16k/32k/64k; each block has two BatchNorms (2 parameters per
    channel), two 3x3 convolutions, and the first block of a group changing shape a 1x1 shortcut."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 16 * 9  # stem convolution
    for g in range(3):
        c_in, c_out = widths[g], widths[g + 1]
        total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
        total += c_in * c_out if (g > 0 or c_in != c_out) else 0
        total += (n - 1) * (4 * c_out + 18 * c_out * c_out)
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes


def build_model(arch: str, num_classes: int, *, drop_rate: float = DEFAULT_DROP_RATE) -> nn.Module:
    """A freshly initialised network. ``arch`` is ``resnet18``, ``wrn-DEPTH-WIDTH`` (e.g. ``wrn-40-2``), ``airnet``
    or ``airnet-WIDTH`` (:mod:`.airnet`; base width 64), a
    segmenter (``espnet``, ``espnet-camvid``; ``num_classes`` = its output channels) or the import path
    ``package.module:factory`` of your own (see :mod:`oodtune.models.imported`).

    ``drop_rate`` is the WRN dropout (0.3 as in the OE/Energy papers); ResNet-18 and imported models ignore it.
    """
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if is_import_path(arch):
        return build_imported(arch, num_classes)
    name = arch.lower()
    if name == "resnet18":
        return ResNet18(num_classes)
    if name in ESPNET_ARCHS:
        return build_espnet(name, num_classes)
    width = airnet_width(name)
    if width is not None:
        return AirNet(num_classes, width)
    m = _WRN.match(name)
    if m:
        depth, width = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ModelError(f"{arch}: WRN depth must be 6n+4 with n >= 1 (10, 16, 28, 40, ...) and width >= 1")
        size = wrn_parameters(depth, width, num_classes)
        if size > MAX_PARAMETERS:
            raise ModelError(f"{arch} would have {size:,} parameters, more than the {MAX_PARAMETERS:,} oodtune builds "
                             "(WRN-28-10 has 36.5 million); choose a smaller depth or width.")
        return WideResNet(depth, width, num_classes, drop_rate)
    raise ModelError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}, wrn-DEPTH-WIDTH, "
                     "airnet-WIDTH or package.module:factory for your own")
