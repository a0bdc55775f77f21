"""One interface for logits *and* penultimate features, for our models and any user ``nn.Module``.

``FeatureModel(model)(x)`` returns ``(logits, features)`` where ``features`` is the input of the final
linear classification layer (the penultimate representation g(x) in the papers), flattened to (B, D).

How features are found, in order:
1. models that define ``forward_features(x) -> (B, D)`` and ``head: nn.Linear`` (all oodtune models)
   are called as ``head(forward_features(x))`` — no hooks, compile-friendly;
2. otherwise a forward pre-hook, registered for the duration of each call, captures the input of the
   classification layer. That layer is
   ``head_name`` if given (a dotted module path such as ``"fc"`` or ``"classifier.1"``), else the *last*
   ``nn.Linear`` registered in the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError


def find_head(model: nn.Module, head_name: str | None = None) -> nn.Linear:
    """The final linear classification layer of ``model`` (see module docstring)."""
    if head_name is not None:
        try:
            layer = model.get_submodule(head_name)
        except AttributeError as exc:
            raise ModelError(f"{type(model).__name__} has no layer {head_name!r} ({exc}); name the classification "
                             "layer by its dotted path as in model.named_modules(), e.g. 'fc' or "
                             "'classifier.1'.") from exc
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"{head_name!r} is a {type(layer).__name__}, expected the final nn.Linear layer.")
        return layer
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear layer to take features from; "
            "pass head_name='...' naming the classification layer, or define forward_features()."
        )
    return linears[-1]


class FeatureModel(nn.Module):
    """Wraps a classifier so that ``forward(x)`` returns ``(logits, penultimate_features)``."""

    def __init__(self, model: nn.Module, head_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.head = find_head(model, head_name)
        self._direct = head_name is None and callable(getattr(model, "forward_features", None))
        self._captured: torch.Tensor | None = None

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._captured = inputs[0]

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._direct:
            feats = self.model.forward_features(x)  # type: ignore[operator]
            return self.head(feats), feats
        # The hook lives only for this call, so the user's model is left exactly as it was given.
        handle = self.head.register_forward_pre_hook(self._capture)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        feats, self._captured = self._captured, None
        if feats is None:
            raise ModelError(
                f"the classification layer of {type(self.model).__name__} was not called in forward(); "
                "pass head_name= naming the layer that produces the logits."
            )
        return logits, feats.flatten(1)
