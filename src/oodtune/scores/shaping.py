"""Activation and weight shaping before a logit score: ReAct, ASH-S/-B/-P and DICE, composed as
``SHAPING[+SHAPING...]+SCORE`` (e.g. ``react+energy``, the ReAct paper's pairing).

A shaping step rewrites the penultimate features g and/or the final layer (W, b); the logits are then recomputed
as f' = W' g' + b' and handed to a logit score (MSP, MaxLogit, Entropy, Energy, GEN, KL matching). Steps apply in
the order written, and a step with ID statistics (ReAct's threshold, DICE's contributions) is fitted on the ID
*train* features as shaped by the steps before it. All shaping math runs in float64.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError, ScoreError
from .base import LogitScore, Score, check_features, check_logits

__all__ = ["ASH", "DICE", "ReAct", "Shaped", "Shaper"]

Head = tuple[torch.Tensor, torch.Tensor]


def _percentile(name: str, value: float, *, upper_open: bool = False) -> float:
    value = float(value)
    if not (0 <= value < 100 if upper_open else 0 <= value <= 100):
        raise ConfigError(f"{name} must be in [0, {'100)' if upper_open else '100]'}, got {value}")
    return value


class Shaper(ABC):
    """One shaping step: ``apply(g, W, b) -> (g', W', b')`` in float64; ``fit`` on ID train features if needed."""

    name: str
    needs_fit: bool = False
    grid: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def fit(self, features: torch.Tensor, head: Head) -> None:  # noqa: B027 (optional hook)
        """ID statistics from the ID *train* features (float64). Default: nothing to fit."""

    @abstractmethod
    def apply(self, features: torch.Tensor, head: Head) -> tuple[torch.Tensor, Head]:
        """Shaped features and head."""

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this step."""
        return {p: getattr(self, p) for p in inspect.signature(type(self)).parameters}


_UNFITTED = "{name} needs ID training statistics: call .fit(logits, features, labels) on the outputs of the ID train " \
            "split before scoring."


class ReAct(Shaper):
    """ReAct (Sun, Guo & Li, NeurIPS 2021): rectify the penultimate activations at c before the head,

    g' = min(g, c),   c = the ``clip_percentile``-th percentile (default 90) of all ID-train activations,

    pooled over units and inputs, with numpy's linear interpolation (``np.percentile``), as in the official
    ``compute_threshold.py``. Deviation: that script estimates c on the ID *validation* images (ImageNet val, which
    is also its test set); here c comes from the ID *train* split.
    """

    name = "react"
    needs_fit = True
    grid = {"clip_percentile": (90.0, 80.0, 85.0, 95.0, 99.0)}

    def __init__(self, clip_percentile: float = 90.0) -> None:
        self.clip_percentile = _percentile("clip_percentile", clip_percentile)
        self.threshold: float | None = None

    def fit(self, features: torch.Tensor, head: Head) -> None:
        self.threshold = float(np.percentile(features.cpu().numpy(), self.clip_percentile))

    def apply(self, features: torch.Tensor, head: Head) -> tuple[torch.Tensor, Head]:
        if self.threshold is None:
            raise ScoreError(_UNFITTED.format(name=self.name))
        return features.clamp(max=self.threshold), head


class ASH(Shaper):
    """Activation shaping (Djurisic et al., "Extremely simple activation shaping for OOD detection", ICLR 2023).

    Per input, keep the k = D - round(D * p / 100) largest activations and zero the others (p = ``prune_percentile``,
    default 90 as in the official CIFAR-10 config ``ash_s@90``), then

    * ASH-P: nothing more;
    * ASH-B: set every kept activation to s1 / k (binarised, the total activation s1 = sum_j g_j preserved);
    * ASH-S: multiply the kept activations by exp(s1 / s2), s2 = their sum after pruning.

    Ties at the k-th value are broken by the lower unit index (the official ``torch.topk`` leaves it unspecified;
    it matters only for ASH-B). Where s2 = 0 (nothing positive left) ASH-S leaves the pruned vector, all zeros, as
    it is instead of producing 0 * inf. The paper applies ASH to post-ReLU (non-negative) features.
    """

    needs_fit = False
    grid = {"prune_percentile": (90.0, 60.0, 70.0, 80.0, 85.0, 95.0)}
    VARIANTS = ("s", "b", "p")

    def __init__(self, variant: str, prune_percentile: float = 90.0) -> None:
        if variant not in self.VARIANTS:
            raise ConfigError(f"ASH variant must be one of {self.VARIANTS}, got {variant!r}")
        self.variant = variant
        self.name = f"ash-{variant}"
        self.prune_percentile = _percentile("prune_percentile", prune_percentile, upper_open=True)

    def apply(self, features: torch.Tensor, head: Head) -> tuple[torch.Tensor, Head]:
        n = features.shape[1]
        k = n - int(np.round(n * self.prune_percentile / 100.0))
        if k < 1:
            raise ScoreError(f"{self.name} with prune_percentile={self.prune_percentile} keeps no activation of "
                             f"{n}; use a smaller prune_percentile.")
        order = torch.sort(features, dim=1, descending=True, stable=True).indices[:, :k]
        kept = features.gather(1, order)
        if self.variant == "b":
            kept = (features.sum(dim=1, keepdim=True) / k).expand_as(kept)
        elif self.variant == "s":
            s1, s2 = features.sum(dim=1, keepdim=True), kept.sum(dim=1, keepdim=True)
            scale = torch.where(s2 != 0, torch.exp(s1 / torch.where(s2 != 0, s2, 1.0)), 1.0)
            kept = kept * scale
        return torch.zeros_like(features).scatter_(1, order, kept), head


class DICE(Shaper):
    """DICE (Sun & Li, "Leveraging sparsification for out-of-distribution detection", ECCV 2022):

    contributions V = m ⊙ W (V_cj = m_j W_cj, m = mean ID-train feature), mask M = [V > the p-th percentile of
    all entries of V] (p = ``sparsity``, default 90 for CIFAR), W' = M ⊙ W; logits f' = W' g + b. The threshold
    uses ``np.percentile`` and the strict ">" of the official ``RouteDICE``.
    """

    name = "dice"
    needs_fit = True
    grid = {"sparsity": (90.0, 10.0, 30.0, 50.0, 70.0)}

    def __init__(self, sparsity: float = 90.0) -> None:
        self.sparsity = _percentile("sparsity", sparsity, upper_open=True)
        self.mask: torch.Tensor | None = None  # (K, D) bool

    def fit(self, features: torch.Tensor, head: Head) -> None:
        weight = head[0]
        contrib = features.mean(dim=0)[None, :] * weight
        threshold = float(np.percentile(contrib.cpu().numpy(), self.sparsity))
        self.mask = contrib > threshold

    def apply(self, features: torch.Tensor, head: Head) -> tuple[torch.Tensor, Head]:
        if self.mask is None:
            raise ScoreError(_UNFITTED.format(name=self.name))
        weight, bias = head
        if self.mask.shape != weight.shape:
            raise ScoreError(f"dice was fitted on a head of shape {tuple(self.mask.shape)}, not {tuple(weight.shape)}.")
        return features, (weight * self.mask.to(weight.device), bias)


class Shaped(Score):
    """``shapers`` applied in order to (g, W, b), then ``score`` on the recomputed logits W' g' + b' (module doc).

    Hyperparameters are the shaping steps' (``clip_percentile``, ``prune_percentile``, ``sparsity``) and the
    score's (e.g. ``temperature``); the selection grid covers the shaping steps' only, the score keeping its
    default as in the papers' pairings.
    """

    needs_head = True

    def __init__(self, shapers: list[Shaper], score: Score) -> None:
        if not shapers:
            raise ConfigError("a shaped score needs at least one shaping step (react, ash-s, ash-b, ash-p, dice).")
        if not isinstance(score, LogitScore):
            raise ConfigError(f"shaping steps feed recomputed logits to a logit score, not {score.name!r}; end the "
                              "name with msp, maxlogit, entropy, energy, gen or klm.")
        names = [name for s in shapers for name in s.grid]
        if len(set(names)) != len(names) or set(names) & set(score.params()):
            raise ConfigError(f"each shaping step may appear once: {'+'.join(s.name for s in shapers)}")
        self.shapers = shapers
        self.score = score
        self.name = "+".join([*(s.name for s in shapers), score.name])
        self.needs_fit = any(s.needs_fit for s in shapers) or score.needs_fit

    def params(self) -> dict[str, Any]:
        out = {k: v for s in self.shapers for k, v in s.params().items()}
        return {**out, **self.score.params()}

    def __repr__(self) -> str:
        return f"Shaped({self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.params().items()) + ")"

    def with_params(self, **changes: Any) -> Shaped:
        unknown = set(changes) - set(self.params())
        if unknown:
            raise ConfigError(f"{self.name} has no option {', '.join(sorted(unknown))}; options: "
                              f"{', '.join(self.params())}")
        shapers = [type(s)(**{**s.params(), **{k: v for k, v in changes.items() if k in s.grid}})
                   for s in self.shapers]
        score = self.score.with_params(**{k: v for k, v in changes.items() if k in self.score.params()})
        new = Shaped(shapers, score)
        if self._weight is not None:
            new.use_head(self._weight, self._bias)
        return new

    def hyperparameter_grid(self, feature_dim: int) -> dict[str, list[Any]]:
        return {k: list(v) for s in self.shapers for k, v in s.grid.items()}

    def hyperparameters(self, feature_dim: int) -> dict[str, Any]:
        return {k: getattr(s, k) for s in self.shapers for k in s.grid}

    def _shape(self, features: torch.Tensor, *, fit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._head(features)
        feats = features.to(head[0].device, torch.float64)
        for step in self.shapers:
            if fit:
                step.fit(feats, head)
            feats, head = step.apply(feats, head)
        weight, bias = head
        return (feats @ weight.T + bias).float(), feats.float()

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Shaped:
        check_logits(logits)
        logits_s, feats_s = self._shape(check_features(features, logits.shape[0]), fit=True)
        self.score.fit(logits_s, feats_s, labels)
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        check_logits(logits)
        logits_s, feats_s = self._shape(check_features(features, logits.shape[0]), fit=False)
        return self.score.from_outputs(logits_s, feats_s).to(features.device)
