"""Architectures by name: the built-in zoo (WRN-d-k, CIFAR ResNet-18; the segmenters ESPNet / ESPNet-CamVid) and
user architectures by import path."""

from __future__ import annotations

import re

from torch import nn

from ..errors import ModelError
from .espnet import ESPNET_ARCHS, build_espnet
from .imported import build_imported, is_import_path
from .resnet import ResNet18
from .wrn import DEFAULT_DROP_RATE, WideResNet

__all__ = ["ARCHITECTURES", "DEFAULT_DROP_RATE", "build_model"]

ARCHITECTURES = ("wrn-40-2", "wrn-16-2", "wrn-28-10", "resnet18", *ESPNET_ARCHS)
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def build_model(arch: str, num_classes: int, *, drop_rate: float = DEFAULT_DROP_RATE) -> nn.Module:
    """A freshly initialised network. ``arch`` is ``resnet18``, ``wrn-DEPTH-WIDTH`` (e.g. ``wrn-40-2``), a
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
    m = _WRN.match(name)
    if m:
        return WideResNet(int(m.group(1)), int(m.group(2)), num_classes, drop_rate)
    raise ModelError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}, wrn-DEPTH-WIDTH "
                     "or package.module:factory for your own")
