"""Your own architecture by import path: ``--arch package.module:factory``.

``factory(num_classes=K)`` must return an ``nn.Module`` whose ``forward(x)`` gives (B, K) logits; it may be an
``nn.Module`` subclass or a plain Python function. Models from the ecosystem fit through a one-line factory, e.g.
``def resnet18(num_classes): return torchvision.models.resnet18(num_classes=num_classes)`` or
``timm.create_model("resnet18", num_classes=num_classes)``; their classification layer is found as described in
:mod:`oodtune.models.features`, and a timm model's ``pretrained_cfg`` mean/std (:func:`input_normalisation`) is
its default input normalisation on import. Checkpoints store the path, so the module has to be
importable (installed, or its folder on ``PYTHONPATH``) wherever such a checkpoint is used. Loading a checkpoint
only ever imports the named module and calls the named factory with ``num_classes``: classes that are not
``nn.Module`` subclasses and built-ins (``builtins:exec`` and the like) are refused.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from numbers import Real

from torch import nn

from ..errors import ModelError

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` has the ``module:factory`` form."""
    return ":" in arch


def build_imported(spec: str, num_classes: int) -> nn.Module:
    """``factory(num_classes=num_classes)`` for ``spec`` = ``package.module:factory`` (see module docstring)."""
    if not _IMPORT_PATH.match(spec):
        raise ModelError(f"--arch {spec!r} is not an import path of the form package.module:factory")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"--arch {spec}: cannot import {module_name!r} ({exc}); install it or add its folder "
                         "to PYTHONPATH.") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"--arch {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module))):
        raise ModelError(f"--arch {spec}: {attr} is a {type(obj).__name__}, not an nn.Module class or a Python "
                         "function returning one.")
    try:
        model = obj(num_classes=num_classes)
    except TypeError as exc:
        raise ModelError(f"--arch {spec}: calling {attr}(num_classes={num_classes}) failed ({exc}); the factory "
                         "must take the number of classes as the keyword argument num_classes.") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"--arch {spec}: {attr}(num_classes=...) returned a {type(model).__name__}, not an nn.Module")
    return model


def input_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from a timm-style ``model.pretrained_cfg`` (or the older ``default_cfg``) when it holds per-channel
    numbers for both, else None."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if not isinstance(cfg, Mapping):
            continue
        mean, std = cfg.get("mean"), cfg.get("std")
        if not all(isinstance(v, (tuple, list)) and v and all(isinstance(x, Real) for x in v) for v in (mean, std)):
            continue
        means, stds = tuple(float(x) for x in mean), tuple(float(x) for x in std)  # type: ignore[union-attr]
        if len(means) == len(stds) and all(x > 0 for x in stds):
            return means, stds
    return None
