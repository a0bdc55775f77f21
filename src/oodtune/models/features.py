"""One interface for logits *and* penultimate features, for our models and any user ``nn.Module``.

``FeatureModel(model)(x)`` returns ``(logits, features)`` where ``features`` is the input of the final
linear classification layer (the penultimate representation g(x) in the papers), flattened to (B, D).

How features are found, in order:
1. models that define ``forward_features(x) -> (B, D)`` and ``head: nn.Linear`` (all oodtune models)
   are called as ``head(forward_features(x))`` — no hooks, compile-friendly. Models that also define
   ``forward_head`` (timm's) are excluded: their ``forward_features`` returns feature maps or tokens *before*
   pooling, and ``forward_head`` pools (and may normalise) before the classifier;
2. otherwise a forward pre-hook, registered for the duration of each call, captures the input of the
   classification layer. That layer is ``head_name`` if given (a dotted module path such as ``"fc"`` or
   ``"classifier.1"``), else ``model.head`` when it is an ``nn.Linear``, else what ``model.get_classifier()``
   returns when that is an ``nn.Linear`` (timm: ``fc`` of ResNets, ``head`` of ViTs, ``head.fc`` of ConvNeXts),
   else the *last* ``nn.Linear`` registered in the model (torchvision: ``fc`` of ResNets, ``classifier.N`` of
   VGG/MobileNet/EfficientNet).

Under autocast the classification layer runs in fp32 on the (bf16) features for the built-in models, so logits
keep fp32 resolution: the scores computed from them (energy, MSP, ...) do not collapse onto bf16's 8-bit mantissa
and tie.

Scores that rewrite the features or the final layer (ReAct, ASH, DICE, ViM, Residual) read the classification
layer's weight and bias through :meth:`FeatureModel.head_parameters`.
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
    get_classifier = getattr(model, "get_classifier", None)  # timm's interface
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Linear):
            return classifier
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
        self._direct = (head_name is None and callable(getattr(model, "forward_features", None))
                        and getattr(model, "head", None) is self.head and not hasattr(model, "forward_head"))
        self._captured: torch.Tensor | None = None

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._captured = inputs[0]

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached copies of the classification layer's weight (K, D) and bias (K,; zeros without a bias)."""
        weight = self.head.weight.detach().clone()
        bias = self.head.bias
        return weight, (torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None
                        else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._direct:
            feats = self.model.forward_features(x)  # type: ignore[operator]
            with torch.autocast(x.device.type, enabled=False):
                return self.head(feats.float()), feats
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
