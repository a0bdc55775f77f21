"""Your own architecture by import path: ``--arch package.module:factory``.

``factory(num_classes=K)`` must return an ``nn.Module`` whose ``forward(x)`` gives (B, K) logits; it may be an
``nn.Module`` subclass or a plain Python function. Checkpoints store the path, so the module has to be
importable (installed, or its folder on ``PYTHONPATH``) wherever such a checkpoint is used. Loading a checkpoint
only ever imports the named module and calls the named factory with ``num_classes``: classes that are not
``nn.Module`` subclasses and built-ins (``builtins:exec`` and the like) are refused.
"""

from __future__ import annotations

import importlib
import inspect
import re

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
