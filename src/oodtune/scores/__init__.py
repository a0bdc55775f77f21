"""Post-hoc OOD scores of a trained classifier.

Convention (all of oodtune): **a score is "higher = more in-distribution"**. Scores that the papers define
as "higher = more anomalous" (energy, entropy, distances) are negated here, so every score can go straight
into ``oodtune.metrics`` without sign bookkeeping.

==============  ===================================================================================================
name            score s(x) (f = logits, g = penultimate features, (W, b) = final linear layer, p = softmax(f))
==============  ===================================================================================================
msp             max_c p_c                                                   (Hendrycks & Gimpel 2017)
maxlogit        max_c f_c                                                   (Hendrycks et al. 2022)
entropy         -H(p) = sum_c p_c log p_c
energy          -E(x; f) = T log sum_c exp(f_c / T); T = 1                  (Liu et al. 2020)
gen             -sum_{top M} p_j^gamma (1 - p_j)^gamma; gamma = 0.1, M = 100 (Liu, Lochman & Zach 2023)
klm             -min_c KL(p || d_c), d_c = mean p over ID-train inputs predicted c   (Hendrycks et al. 2022)
odin            max_c softmax(f(x') / T)_c,  x' = x - eps sign(-grad_x log max_c softmax(f(x)/T)_c)
                (Liang et al. 2018; T = 1000, eps = 0.0014)
mahalanobis     -min_c (g - mu_c)^T Sigma^+ (g - mu_c), class means mu_c and tied covariance Sigma
                fitted on ID train features                                 (Lee et al. 2018)
knn             -|| z - z_(k) ||_2, z = g / ||g||, z_(k) = k-th nearest normalised ID-train feature
                (Sun et al. 2022; k = 50)
vim             log sum_c exp f_c - alpha ||(g - u) P^perp||, u = -W^+ b, P the principal subspace of ID-train
                features, alpha from ID train                               (Wang et al. 2022)
residual        -||(g - u) P^perp||                                          (Wang et al. 2022, baseline)
react+energy    energy of W min(g, c) + b, c = 90th percentile of ID-train activations  (Sun, Guo & Li 2021)
ash-s+energy    energy of W ASH-S(g) + b: per input, keep the top 10% of g, scale by exp(s1/s2)
ash-b+energy    ... the kept activations set to sum(g) / k                 (Djurisic et al. 2023;
ash-p+energy    ... pruning only                                            prune percentile 90)
dice+energy     energy of (M ⊙ W) g + b, M keeps the top 10% of the ID-train contributions mean(g)_j W_cj
                (Sun & Li 2022)
==============  ===================================================================================================

Shaping steps compose: ``build_score("react+dice+msp")`` applies ReAct, then DICE, then MSP on the recomputed
logits (:mod:`.shaping`); a bare ``react``/``ash-s``/``ash-b``/``ash-p``/``dice`` means its paper's pairing with
energy. ``SCORE_NAMES`` lists the names above (what the CLI and the benchmark schema accept).

Mahalanobis here is the *feature-only* variant: penultimate layer, no input pre-processing and no
ensemble over layers (Lee et al.'s full method adds both). It uses the *squared* distance as in the
paper's formula; the square root would give the same ranking and hence the same metrics.

Needs: ``needs_fit`` scores (mahalanobis, knn, klm, vim, residual, react+..., dice+...) take ID statistics from
``fit(logits, features, labels)`` on the outputs of the ID *train* split; ``needs_head`` scores (vim, residual,
shaped) need ``use_head(weight, bias)`` first (``FeatureModel.head_parameters()``); ODIN needs input gradients
(``needs_input_grad``): use ``score_inputs(net, x)``; its ``from_outputs`` is the temperature-scaled MSP without
the perturbation. Each score's ``grid`` holds its hyperparameter candidates for leak-free selection
(:mod:`oodtune.scores.selection`); the defaults above are the papers'.

Segmentation: ``score_map(score, logits)`` applies a logit score (``PIXEL_SCORE_NAMES``) to every pixel of
(B, C, H, W) logits (:mod:`.pixel`).
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import signature
from typing import Any

from ..errors import ConfigError, ScoreError
from .base import FittedScore, LogitScore, Score
from .features import KNN, Mahalanobis, Residual, ViM
from .logits import GEN, MSP, ODIN, Energy, Entropy, KLMatching, MaxLogit
from .pixel import PIXEL_SCORE_NAMES, score_map
from .shaping import ASH, DICE, ReAct, Shaped, Shaper

__all__ = [
    "ASH", "DICE", "GEN", "KNN", "MSP", "ODIN", "PIXEL_SCORE_NAMES", "SCORE_NAMES", "SHAPING_NAMES", "Energy",
    "Entropy", "FittedScore", "KLMatching", "LogitScore", "Mahalanobis", "MaxLogit", "ReAct", "Residual", "Score",
    "ScoreError", "Shaped", "Shaper", "ViM", "build_score", "score_map",
]

_REGISTRY: dict[str, type[Score]] = {cls.name: cls for cls in (
    MSP, MaxLogit, Entropy, Energy, GEN, KLMatching, ODIN, Mahalanobis, KNN, ViM, Residual)}
_SHAPERS: dict[str, Callable[..., Shaper]] = {
    "react": ReAct, "ash-s": lambda **kw: ASH("s", **kw), "ash-b": lambda **kw: ASH("b", **kw),
    "ash-p": lambda **kw: ASH("p", **kw), "dice": DICE,
}
SHAPING_NAMES: tuple[str, ...] = tuple(_SHAPERS)
#: The named scores: the plain ones, then each shaping step with the score its paper pairs it with (energy).
SCORE_NAMES: tuple[str, ...] = (*_REGISTRY, *(f"{s}+energy" for s in _SHAPERS))


def _split_options(parts: list[str], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Route ``kwargs`` to the components (shaping steps, then the score) whose constructor takes them."""
    def accepted(part: str) -> set[str]:
        factory = _SHAPERS.get(part)
        return set(factory().params()) - {"variant"} if factory else set(signature(_REGISTRY[part]).parameters)

    names = [accepted(p) for p in parts]
    routed: list[dict[str, Any]] = [{} for _ in parts]
    for key, value in kwargs.items():
        owners = [i for i, n in enumerate(names) if key in n]
        if not owners:
            raise ConfigError(f"bad options for score {'+'.join(parts)!r}: no component takes {key!r}")
        routed[owners[0]][key] = value
    return routed


def build_score(name: str, **kwargs: Any) -> Score:
    """A fresh score by name (one of ``SCORE_NAMES``, or a shaping composition such as ``react+dice+msp``);
    ``kwargs`` go to the constructor of the component that takes them (e.g. ``temperature``, ``clip_percentile``).
    """
    key = name.strip().lower()
    parts = [p.strip() for p in key.split("+")]
    if parts[-1] in _SHAPERS:
        parts.append("energy")  # a bare shaping step means its paper's pairing with energy
    *steps, final = parts
    bad = [p for p in steps if p not in _SHAPERS] + ([final] if final not in _REGISTRY else [])
    if bad:
        raise ConfigError(f"unknown score {name!r}; choose one of {', '.join(SCORE_NAMES)}, or compose shaping steps "
                          f"({', '.join(SHAPING_NAMES)}) with a logit score, e.g. react+msp.")
    options = _split_options(parts, kwargs)
    try:
        score = _REGISTRY[final](**options[-1])
        if not steps:
            return score
        return Shaped([_SHAPERS[s](**o) for s, o in zip(steps, options, strict=False)], score)
    except TypeError as err:
        raise ConfigError(f"bad options for score {key!r}: {err}") from None
