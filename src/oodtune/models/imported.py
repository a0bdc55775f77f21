"""Your own architecture by import path: ``--arch package.module:factory``.

``factory(num_classes=K)`` must return an ``nn.Module`` whose ``forward(x)`` gives (B, K) logits; it may be an
``nn.Module`` subclass or a plain Python function. Models from the ecosystem fit through a one-line factory, e.g.
``def resnet18(num_classes): return torchvision.models.resnet18(num_classes=num_classes)`` or
``timm.create_model("resnet18", num_classes=num_classes)``; their classification layer is found as described in
:mod:`oodtune.models.features`, and a timm model's ``pretrained_cfg`` mean/std (:func:`input_normalisation`) is
its default input normalisation on import. Checkpoints store the path, so the module has to be
importable (installed, or its folder on ``PYTHONPATH``) wherever such a checkpoint is used.

Building such a model imports and runs the named module, so a file never decides on its own that this happens:

* A checkpoint whose architecture is an import path is loaded only if the user names that same path again —
  ``--trust-arch package.module:factory`` on the command line, ``trusted_archs(...)`` or ``trust_arch=`` in
  Python (:func:`check_trusted`). Building a model by name in Python (``build_model("pkg.mod:factory", K)``) or
  with ``--arch`` on the command line is such a statement.
* The module is never imported from the current directory implicitly: the entry that ``python -m`` / ``python
  -c`` put first on ``sys.path`` is skipped unless that folder is on ``PYTHONPATH`` (a ``evilnets.py`` next to a
  downloaded checkpoint is not picked up).
* Only the named factory is called, with ``num_classes``: classes that are not ``nn.Module`` subclasses and
  built-ins (``builtins:exec`` and the like) are refused.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Real
from types import ModuleType

from torch import nn

from ..errors import ModelError

__all__ = ["build_imported", "check_trusted", "input_normalisation", "is_import_path", "trusted_archs"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TRUSTED: ContextVar[frozenset[str]] = ContextVar("oodtune_trusted_archs", default=frozenset())


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` has the ``module:factory`` form."""
    return ":" in arch


def _check_spec(spec: str) -> None:
    if not _IMPORT_PATH.match(spec):
        raise ModelError(f"--arch {spec!r} is not an import path of the form package.module:factory")


@contextmanager
def trusted_archs(*specs: str) -> Iterator[None]:
    """Within this block, checkpoints whose architecture is one of ``specs`` (``package.module:factory``) may be
    loaded, which imports that module and calls the factory. Naming them is the caller's statement that the code
    is trusted; nothing else does it (see the module docstring)."""
    for spec in specs:
        _check_spec(spec)
    token = _TRUSTED.set(_TRUSTED.get() | frozenset(specs))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_trusted(arch: str, source: str) -> None:
    """Refuse to build ``arch`` for ``source`` (a checkpoint, a config file) unless it is a built-in architecture
    or the user named it (:func:`trusted_archs`)."""
    if is_import_path(arch) and arch not in _TRUSTED.get():
        raise ModelError(
            f"{source} names the architecture {arch!r}: Python code that building the model would import and run. "
            "oodtune never runs code because a file says so. If you trust that module, name it yourself: "
            f"--trust-arch {arch} on the command line, trusted_archs({arch!r}) or trust_arch=[{arch!r}] in Python."
        )


def _import(spec: str, module_name: str) -> ModuleType:
    """Import ``module_name`` without the implicit current-directory entry of ``sys.path`` (module docstring)."""
    explicit = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    first = sys.path[0] if sys.path else None
    implicit = (first is not None and os.path.abspath(first or os.curdir) == os.getcwd()
                and os.getcwd() not in explicit)
    saved = list(sys.path)
    if implicit:
        del sys.path[0]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        where = " (the current directory is not searched unless it is on PYTHONPATH)" if implicit else ""
        raise ModelError(f"--arch {spec}: cannot import {module_name!r} ({exc}){where}; install it or add its folder "
                         "to PYTHONPATH.") from exc
    finally:
        sys.path[:] = saved


def build_imported(spec: str, num_classes: int) -> nn.Module:
    """``factory(num_classes=num_classes)`` for ``spec`` = ``package.module:factory`` (see module docstring)."""
    _check_spec(spec)
    module_name, attr = spec.split(":")
    obj: object = _import(spec, module_name)
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
