"""Atomic, ``weights_only``-loadable checkpoints.

A checkpoint is a plain dict of tensors and JSON-like values:
``{"format": 1, "model": state_dict, "meta": {...}, "train_state": {...} | None}``. ``meta`` says how to
rebuild and feed the model (arch, num_classes, classes, mean, std, resolution) and what produced it.
Files are written to a temporary sibling, fsync'ed and moved into place with ``os.replace``, so a crash
never leaves a truncated checkpoint; they are read back with ``torch.load(weights_only=True)``. Rebuilding the
model of a checkpoint whose architecture is an import path needs the user's explicit trust
(:mod:`oodtune.models.imported`): a checkpoint never makes oodtune import code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..utils.atomic import write_atomic
from .features import FeatureModel
from .imported import check_trusted, trusted_archs
from .meta import RunMeta
from .segmentation import SegmentationModel
from .zoo import build_model

FORMAT_VERSION = 1


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's ``state_dict`` (every entry's name, dtype, shape and bytes, in order): the same for a
    model and its checkpoint, different as soon as one weight differs. The one fingerprint of weights (a detector's
    record, memoised passes of a network)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_atomic(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder + fsync + os.replace); with
    ``overwrite=False`` an existing ``path`` is never replaced (see :func:`oodtune.utils.atomic.write_atomic`)."""
    return write_atomic(path, lambda fh: torch.save(obj, fh), overwrite=overwrite)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DDP / torch.compile / FeatureModel / SegmentationModel wrappers.

    Checkpoints store the classifier's own state_dict (keys as in ``build_model(arch)``), so that
    :func:`load_model` can rebuild it; a FeatureModel's state_dict would carry ``model.``/``head.`` prefixes.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, (FeatureModel, SegmentationModel)):
            model = model.model
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, meta: RunMeta, train_state: dict[str, Any] | None = None, *,
    overwrite: bool = True,
) -> Path:
    """Write model weights + ``meta`` (+ optimizer/scheduler/RNG ``train_state`` for resuming) atomically."""
    if not isinstance(meta, RunMeta):
        raise TypeError(f"meta must be a RunMeta, got {type(meta).__name__}")
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    return save_atomic({"format": FORMAT_VERSION, "model": state, "meta": meta.to_dict(), "train_state": train_state},
                       path, overwrite=overwrite)


def _load_tensors(path: Path, what: str, missing_fix: str, unreadable_fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; errors name the file and the fix."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; {missing_fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} {path} with torch.load(weights_only=True): {exc}. "
                              f"{unreadable_fix}") from exc


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True``, its ``"meta"`` as a :class:`RunMeta` (older
    layouts migrated); clear errors for missing/foreign files."""
    path = Path(path)
    ckpt = _load_tensors(path, "checkpoint", "train one with `oodtune pretrain` or check the path.",
                         "Is it a complete oodtune checkpoint?")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "model" not in ckpt:
        raise CheckpointError(
            f"{path} is not an oodtune checkpoint (format {FORMAT_VERSION}); to use weights trained elsewhere, "
            "convert them with `oodtune import-model` (or wrap the model in oodtune.models.FeatureModel in Python)."
        )
    try:
        ckpt["meta"] = RunMeta.from_dict(ckpt.get("meta"))  # type: ignore[arg-type]  # validated inside
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return ckpt


def read_meta(path: str | os.PathLike) -> RunMeta:
    """Only the :class:`RunMeta` of a checkpoint."""
    meta: RunMeta = read_checkpoint(path)["meta"]
    return meta


def load_model(path: str | os.PathLike, *, trust_arch: Collection[str] = ()) -> tuple[nn.Module, RunMeta]:
    """Rebuild the model stored in an oodtune checkpoint; returns ``(model_in_eval_mode, meta)``.

    A checkpoint whose architecture is an import path (``package.module:factory``) is refused unless that path is
    in ``trust_arch`` or trusted by an enclosing :func:`~oodtune.models.trusted_archs` block."""
    ckpt = read_checkpoint(path)
    meta: RunMeta = ckpt["meta"]
    with trusted_archs(*trust_arch):
        check_trusted(meta.arch, f"checkpoint {path}")
    outputs = meta.num_classes + meta.extra_channels
    model = build_model(meta.arch, outputs, drop_rate=meta.drop_rate)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta.arch} with {outputs} outputs: {exc}") from exc
    return model.eval(), meta


def load_feature_model(path: str | os.PathLike, *, trust_arch: Collection[str] = ()) -> tuple[FeatureModel, RunMeta]:
    """:func:`load_model` wrapped in a :class:`FeatureModel` whose features are the input of the layer named
    by ``meta.head`` (set by ``oodtune import-model --head``), else of the automatically found head."""
    model, meta = load_model(path, trust_arch=trust_arch)
    return FeatureModel(model, meta.head), meta


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights saved elsewhere, read with ``weights_only=True``: a plain ``state_dict``, or a dict holding one
    under ``"state_dict"`` or ``"model"`` (common training-script layouts). A ``module.`` prefix on every key
    (``DataParallel`` / DDP saves) is removed."""
    obj = _load_tensors(Path(path), "weights file", "check the path.",
                        "Save the model's state_dict() (tensors only), not the pickled model object.")

    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    state = next((c for c in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict)))
                  if is_state(c)), None)
    if state is None:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} holds no state_dict (found {keys}); save model.state_dict() with torch.save.")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state
