"""One interface for segmentation networks: ``SegmentationModel(model, ...)(x)`` gives (B, C, H, W) logits, C = the
K class logits followed by ``extra_channels`` (void / abstention), and only the named ``trainable`` modules train.

Which part trains (:func:`resolve_train_part`, ``TrainConfig.train_part``): ``head`` = the checkpoint's own
``trainable`` modules (ESPNet: its last decoder stage, ``conv`` + ``classifier``); ``decoder`` = every module after
the encoder (ESPNet: all top-level modules but ``encoder``; the counterpart of PEBAL's ``final`` block); ``all`` =
the whole network; or a comma-separated list of module names. **BatchNorm, per choice:**

=========  ==============================================================================================
part       BatchNorm layers
=========  ==============================================================================================
head       frozen part (encoder, decoder up to the head): eval mode, pretrained running statistics, never
           updated; the head's own BatchNorm: train mode (batch statistics, running statistics updated)
decoder    encoder: as frozen above; every BatchNorm of the decoder: train mode (updated)
all        every BatchNorm in train mode (batch statistics, running statistics updated), as the reference
           leaves its whole network
names      the named modules' BatchNorm in train mode, every other one frozen in eval mode
=========  ==============================================================================================

Frozen modules stay in eval mode whatever ``train()`` is called with: their BatchNorm layers normalise with the
pretrained running statistics and never update them, so the frozen part computes exactly the pretrained function
(the PEBAL reference code leaves the whole network in train mode, so its frozen BatchNorm layers normalise with
batch statistics and their running statistics drift; we do not). The trainable block follows ``train()``.

A network that splits into a frozen trunk and a trainable tail (``forward_trunk`` / ``forward_tail`` and
``tail_modules``, as :class:`~oodtune.models.espnet.ESPNet`) whose tail is exactly the ``trainable`` modules is
:attr:`~SegmentationModel.splits`: fine-tuning can then cache the trunk's output of unchanged frames. The tail
runs in fp32 even under autocast, so the logits (and every pixel score computed from them) keep fp32 resolution.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["DECODER_EXCLUDES", "SegmentationModel", "TRAIN_PARTS", "resolve_train_part"]

#: The named parts ``TrainConfig.train_part`` accepts besides a comma-separated list of module names.
TRAIN_PARTS = ("head", "decoder", "all")
#: Per architecture: the top-level modules that are *not* its decoder (the encoder / backbone).
DECODER_EXCLUDES: dict[str, tuple[str, ...]] = {"espnet": ("encoder",), "espnet-camvid": ("encoder",)}


def resolve_train_part(model: nn.Module, arch: str, part: str | None, head: Sequence[str]) -> tuple[str, ...]:
    """The module names that train for ``part`` (module docstring; ``None`` or ``head``: ``head``, the
    checkpoint's own trainable modules). ``()`` means the whole network."""
    if part is None or part == "head":
        return tuple(head)
    if part == "all":
        return ()
    if part == "decoder":
        if arch not in DECODER_EXCLUDES:
            raise ModelError(f"train_part 'decoder' is defined for {', '.join(DECODER_EXCLUDES)}, not for {arch!r}; "
                             "name the decoder's modules instead (--train-part conv,classifier).")
        return tuple(n for n, _ in model.named_children() if n not in DECODER_EXCLUDES[arch])
    names = tuple(n.strip() for n in part.split(",") if n.strip())
    if not names:
        raise ModelError(f"train_part {part!r} names no module; use one of {', '.join(TRAIN_PARTS)} or module names.")
    return names


class SegmentationModel(nn.Module):
    """Wraps a segmentation network (see the module docstring)."""

    def __init__(self, model: nn.Module, num_classes: int, extra_channels: int = 0,
                 trainable: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.extra_channels = int(extra_channels)
        self.set_trainable(trainable)

    def set_trainable(self, trainable: Sequence[str]) -> None:
        """Train the modules named ``trainable`` (all of the network when empty), freeze every other parameter."""
        model = self.model
        blocks = []
        for name in trainable:
            try:
                blocks.append(model.get_submodule(name))
            except AttributeError as exc:
                raise ModelError(f"{type(model).__name__} has no module {name!r} to fine-tune ({exc}); name the last "
                                 "block by its dotted path as in model.named_modules() (--trainable NAME).") from exc
        self.trainable = tuple(trainable)
        self._blocks = blocks or [model]
        for p in model.parameters():
            p.requires_grad_(False)
        for block in self._blocks:
            for p in block.parameters():
                p.requires_grad_(True)

    @property
    def num_outputs(self) -> int:
        return self.num_classes + self.extra_channels

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters fine-tuning updates (those of the trainable blocks)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> SegmentationModel:
        self.training = mode
        self.model.eval()
        for block in self._blocks:
            block.train(mode)
        return self

    @property
    def splits(self) -> bool:
        """Whether the network is a frozen trunk followed by exactly the trainable modules (module docstring)."""
        tail = getattr(self.model, "tail_modules", None)
        return (callable(getattr(self.model, "forward_trunk", None)) and tail is not None
                and set(tail) == set(self.trainable))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's output for input ``x`` (only when :attr:`splits`)."""
        return self.model.forward_trunk(x)  # type: ignore[operator]

    def tail(self, trunk: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Logits from the trunk's output, in fp32 (autocast off); ``size`` is the input's (H, W), for the check."""
        with torch.autocast(trunk.device.type, enabled=False):
            out = self.model.forward_tail(trunk.float())  # type: ignore[operator]
        return self._checked(out, tuple(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.splits:
            return self.tail(self.trunk(x), x.shape[-2:])
        return self._checked(self.model(x), tuple(x.shape[-2:]))

    def _checked(self, out: object, size: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[1] != self.num_outputs \
                or tuple(out.shape[-2:]) != size:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"a segmentation model must return logits of shape (B, {self.num_outputs}, H, W) for "
                             f"(B, 3, H, W) input ({self.num_classes} classes + {self.extra_channels} extra), got "
                             f"{shape} for a {size} input; check --dataset / --extra-channels, or upsample the "
                             "output to the input size in the model.")
        return out
