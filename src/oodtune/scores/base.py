"""The :class:`Score` interface every post-hoc score implements, and the input checks they share.

A score maps a batch of logits (B, K) and penultimate features (B, D) to (B,) values, **higher = more
in-distribution**. Three optional needs are declared as class flags:

* ``needs_fit`` — statistics of the ID *train* split: call ``fit(logits, features, labels)`` on its outputs;
* ``needs_head`` — the final linear layer's weight (K, D) and bias (K,): call ``use_head(weight, bias)``
  (``FeatureModel.head_parameters()`` gives them) before ``fit``/scoring;
* ``needs_input_grad`` — input gradients (ODIN): score with ``score_inputs(net, x)``.

``grid`` lists each hyperparameter's candidate values for leak-free selection on a validation pair
(:mod:`oodtune.scores.selection`); the constructor's default is the paper's value and always one of the candidates.
"""

from __future__ import annotations

import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..errors import ScoreError
from ..models.features import FeatureModel

__all__ = ["FittedScore", "LogitScore", "Score", "check_features", "check_logits", "f64_device"]


def _exporting() -> bool:
    """True while ``torch.export`` (also under ``torch.onnx.export``) traces a score: the finiteness checks are
    data-dependent and stay with the Python path; an exported detector flags non-finite scores as OOD instead."""
    return torch.compiler.is_exporting()


def check_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as float32 after checking their shape (B, K) and that they are finite."""
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ScoreError(f"logits must have shape (batch, num_classes), got {tuple(logits.shape)}.")
    if not _exporting() and not torch.isfinite(logits).all():
        raise ScoreError("logits contain NaN/inf; the model produced non-finite outputs "
                         "(diverged checkpoint or overflowing precision).")
    return logits.float()


def check_features(features: torch.Tensor, batch: int | None = None, dim: int | None = None) -> torch.Tensor:
    """``features`` after checking their shape (B, D), the batch size and dimension when given, finiteness."""
    if features.ndim != 2:
        raise ScoreError(f"features must have shape (batch, dim), got {tuple(features.shape)}; "
                         "flatten them (FeatureModel does) before scoring.")
    if batch is not None and features.shape[0] != batch:
        raise ScoreError(f"{features.shape[0]} feature rows but {batch} logit rows; pass the outputs of one batch.")
    if dim is not None and features.shape[1] != dim:
        raise ScoreError(f"features have dimension {features.shape[1]} but the score was fitted on dimension {dim}; "
                         "score with the same model (and layer) that produced the fit statistics.")
    if not _exporting() and not torch.isfinite(features).all():
        raise ScoreError("features contain NaN/inf; the model produced non-finite outputs.")
    return features


def f64_device(t: torch.Tensor) -> torch.device:
    """Where float64 math can run for ``t``: its own device, except MPS (no float64) -> CPU."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


class Score(ABC):
    """A post-hoc OOD score: ``from_outputs(logits, features) -> (B,)``, higher = more in-distribution."""

    name: str
    needs_fit: bool = False  # needs ID training statistics (call fit first)
    needs_input_grad: bool = False  # needs the network and input gradients (use score_inputs)
    needs_head: bool = False  # needs the final linear layer (call use_head first)
    #: hyperparameter -> candidate values for selection on a validation pair; empty = nothing to choose.
    grid: ClassVar[Mapping[str, Sequence[Any]]] = {}

    _weight: torch.Tensor | None = None  # (K, D) float64, set by use_head
    _bias: torch.Tensor | None = None  # (K,) float64

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Score:
        """Fit ID statistics on the outputs of the ID *train* split. Default: nothing to fit."""
        return self

    def use_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Score:
        """Give the score the final linear layer, logits = features @ weight.T + bias (float64 copies are kept)."""
        if weight.ndim != 2:
            raise ScoreError(f"the head weight must have shape (num_classes, dim), got {tuple(weight.shape)}.")
        bias = torch.zeros(weight.shape[0]) if bias is None else bias
        if bias.shape != (weight.shape[0],):
            raise ScoreError(f"the head bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},).")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ScoreError("the head weight/bias contain NaN/inf; the checkpoint is broken.")
        self._weight = weight.detach().to(f64_device(weight), torch.float64).clone()
        self._bias = bias.detach().to(self._weight.device, torch.float64).clone()
        return self

    def _head(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) in float64 on the float64 device of ``like``; an error if use_head was not called."""
        if self._weight is None or self._bias is None:
            raise ScoreError(f"{self.name} needs the final linear layer: call .use_head(weight, bias) first "
                             "(FeatureModel.head_parameters() returns them).")
        dev = f64_device(like)
        if like.ndim == 2 and like.shape[1] != self._weight.shape[1]:
            raise ScoreError(f"features have dimension {like.shape[1]} but the head expects {self._weight.shape[1]}; "
                             "score with the model whose head was given.")
        return self._weight.to(dev), self._bias.to(dev)

    @abstractmethod
    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from a batch of logits (B, K) and penultimate features (B, D)."""

    def score_inputs(self, net: FeatureModel, x: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of the (already normalised) inputs ``x``: one no-grad forward pass of ``net``."""
        with torch.no_grad():
            logits, features = net(x)
        return self.from_outputs(logits, features)

    # ------------------------------------------------------------------------- hyperparameters

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this score (hyperparameters and options)."""
        return {p: getattr(self, p) for p in inspect.signature(type(self)).parameters}

    def with_params(self, **changes: Any) -> Score:
        """A fresh, unfitted copy with ``changes`` applied; the head given to ``use_head``, if any, is kept."""
        new = type(self)(**{**self.params(), **changes})
        if self._weight is not None:
            new.use_head(self._weight, self._bias)
        return new

    def hyperparameters(self, feature_dim: int) -> dict[str, Any]:
        """The current value of every hyperparameter in the grid (resolved for ``feature_dim`` features)."""
        return {k: getattr(self, k) for k in self.hyperparameter_grid(feature_dim)}

    def hyperparameter_grid(self, feature_dim: int) -> dict[str, list[Any]]:
        """Candidate values per hyperparameter for features of dimension ``feature_dim``."""
        return {k: list(v) for k, v in self.grid.items()}

    def candidates(self, feature_dim: int) -> list[dict[str, Any]]:
        """Every setting of the grid, the current one (the paper default unless changed) first."""
        grid = self.hyperparameter_grid(feature_dim)
        current = self.hyperparameters(feature_dim)
        out = [current]
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values, strict=True))
            if setting not in out:
                out.append(setting)
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"


class LogitScore(Score):
    """Scores that only read the logits."""

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.from_logits(check_logits(logits))

    @abstractmethod
    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from float32 logits (B, K)."""


class FittedScore(Score):
    """Scores with ID-train statistics: ``fit`` sets ``_dim`` (the feature dimension) and the statistics."""

    needs_fit = True
    _dim: int | None = None

    def _require_fit(self) -> int:
        if self._dim is None:
            raise ScoreError(f"{self.name} needs ID training statistics: call .fit(logits, features, labels) on the "
                             "outputs of the ID train split before scoring.")
        return self._dim
