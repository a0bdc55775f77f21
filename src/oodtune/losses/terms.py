"""OOD-aware training losses, each a small unit usable on any classifier.

The trainer runs ONE forward pass over ``cat([x_in, x_out])`` and hands every term a :class:`LossInputs`
(ID logits/labels, optional penultimate features, optional outlier logits). A method is a
:class:`CompositeLoss` — a sum of terms — built by :func:`build_method_loss`:

============================  =====================================================================
method                        terms (defaults = the reference CIFAR-10 / WRN-40-2 fine-tuning settings)
============================  =====================================================================
``ce``                        :class:`CrossEntropy` (pretraining)
``oe``                        CE + :class:`OutlierExposure` (λ=0.5)             Hendrycks et al., ICLR 2019
``energy-oe``                 CE + :class:`EnergyHinge` (m_in=-23, m_out=-5, λ=0.1)  Liu et al., NeurIPS 2020
``balanced-energy``           CE + :class:`BalancedEnergy` (+ α=10, prior P_γ)       Choi et al., CVPR 2023
``sparsity``                  CE + :class:`Sparsity` (λ=1e-3)                       Chen & Li, 2023
``a+b``                       CE + the terms of ``a`` and ``b``, e.g. ``balanced-energy+sparsity``
============================  =====================================================================

Energies use T=1: E(x) = -log Σ_j exp f_j(x) (same as :func:`oodtune.functional.energy`). All terms compute
in float32 (float64 is kept, for gradcheck), so bf16 logits from autocast are safe.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DivergenceError
from ..functional import energy
from .options import TaskLosses

__all__ = [
    "LossInputs", "LossTerm", "CrossEntropy", "OutlierExposure", "EnergyHinge", "BalancedEnergy", "Sparsity",
    "CompositeLoss", "build_method_loss", "METHODS", "TERM_ARGUMENTS", "CLASSIFICATION_LOSSES",
    "as_float", "require_input", "squared_hinge", "mean_or_zero", "uniform_cross_entropy", "energy_in_hinge",
    "outlier_affinity",
]


@dataclass(frozen=True)
class LossInputs:
    """What one training step hands the loss (slices of a single forward pass over ``cat([x_in, x_out])``)."""

    logits_in: Tensor  # (B_in, K)
    labels_in: Tensor  # (B_in,) int64
    features_in: Tensor | None = None  # (B_in, D) penultimate features g(x), for Sparsity
    logits_out: Tensor | None = None  # (B_out, K) auxiliary outliers; None when the method uses none
    # segmentation (oodtune.losses.pixel): the rows above are pixels; the maps keep the spatial layout
    logits_map: Tensor | None = None  # (B, C, H, W) every output channel (C = K + void/abstention channels)
    labels_map: Tensor | None = None  # (B, H, W) int64: class, the ignore value, or the outlier label
    # segmentation: the energy map E = -logsumexp over the K class channels of logits_map, float32 (B, H, W), and
    # its values at the rows of logits_in, computed once by the trainer for every term that needs them
    energy_map: Tensor | None = None
    energy_in: Tensor | None = None  # (B_in,)


# ----------------------------------------------------------------------------------------------- helpers
def as_float(t: Tensor) -> Tensor:
    """``t`` in float32 (bf16/fp16/fp32 inputs) or float64 (kept as is, so gradcheck can run)."""
    return t if t.dtype == torch.float64 else t.float()


def squared_hinge(x: Tensor) -> Tensor:
    """max(0, x)²."""
    return F.relu(x).square()


def mean_or_zero(x: Tensor) -> Tensor:
    """``x.mean()``, or 0 for an empty ``x`` (a segmentation batch may hold no outlier pixel)."""
    return x.mean() if x.numel() else x.sum()


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """H(u; softmax(f)) = -(1/K) Σ_j log softmax_j(f) = logsumexp(f) - mean_j f_j, per row (OE paper)."""
    x = as_float(logits)
    return torch.logsumexp(x, dim=1) - x.mean(dim=1)


def energy_in_hinge(inp: LossInputs, m_in: float) -> Tensor:
    """L_in = mean over ID samples of max(0, E(x_in) - m_in)² (Liu et al. 2020, Eq. 10); E from ``inp.energy_in``
    when the trainer computed it, else from ``inp.logits_in``."""
    e = inp.energy_in if inp.energy_in is not None else energy(inp.logits_in)
    return squared_hinge(e - m_in).mean()


def outlier_affinity(logits: Tensor, prior: Tensor) -> Tensor:
    """Z_γ(x) = Σ_j softmax_j(f(x)) · P_γ(y=j|o), per row (Balanced Energy).

    High Z: x looks like a class that outliers are often predicted as (a "majority" outlier class).
    """
    x = as_float(logits)
    # an elementwise product and sum, not ``@``: autocast would run a matrix product in bf16
    return (torch.softmax(x, dim=1) * prior.to(device=x.device, dtype=x.dtype)).sum(1)


def require_input(t: Tensor | None, term: str, field: str) -> Tensor:
    if t is None:
        raise ConfigError(f"loss term {term!r} needs LossInputs.{field}, but it is None "
                         "(the trainer must fill it when loss.needs_outliers / loss.needs_features is true).")
    return t


def _check_weight(weight: float, name: str) -> float:
    if not weight >= 0:  # also rejects NaN
        raise ConfigError(f"{name} weight must be >= 0, got {weight}")
    return float(weight)


def _check_margins(m_in: float, m_out: float) -> None:
    if not m_in < m_out:
        raise ConfigError(f"energy margins need m_in < m_out (ID energy is pushed below m_in, outlier energy above "
                         f"m_out), got m_in={m_in}, m_out={m_out}")


# ----------------------------------------------------------------------------------------------- terms
class LossTerm(nn.Module, ABC):
    """One additive loss term, an ``nn.Module``: ``term(inp)`` returns a scalar tensor (float32, or float64 for
    float64 inputs). Tensors a term holds (a class prior) are buffers, so ``.to(device)`` moves them once."""

    name: str
    needs_outliers: bool = False
    needs_features: bool = False

    @abstractmethod
    def forward(self, inp: LossInputs) -> Tensor: ...

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


class CrossEntropy(LossTerm):
    """L_CE = -mean log softmax_y(f(x_in)) on the labelled ID batch."""

    name = "ce"

    def forward(self, inp: LossInputs) -> Tensor:
        return F.cross_entropy(as_float(inp.logits_in), inp.labels_in)


class OutlierExposure(LossTerm):
    """λ · mean over outliers of H(u; softmax(f(x_out))) (Hendrycks et al., ICLR 2019; λ=0.5 for CIFAR).

    Reference code: ``0.5 * -(x.mean(1) - torch.logsumexp(x, dim=1)).mean()``. H(u; p) >= H(u) = log K,
    with the minimum λ·log K at a uniform softmax (all logits of a row equal).
    """

    name = "oe"
    needs_outliers = True

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = _check_weight(weight, "OE")

    def forward(self, inp: LossInputs) -> Tensor:
        logits_out = require_input(inp.logits_out, self.name, "logits_out")
        return self.weight * uniform_cross_entropy(logits_out).mean()


class EnergyHinge(LossTerm):
    """Energy-bounded fine-tuning (Liu et al., NeurIPS 2020), T=1:

        λ · [ mean_in max(0, E(x_in) - m_in)²  +  mean_out max(0, m_out - E(x_out))² ]

    ID energy is pushed *below* m_in, outlier energy *above* m_out. (The Balanced Energy slides print the
    outlier hinge as max(0, E - m_out)²; that is a typo — the Energy paper and both authors' code penalise
    outlier energy BELOW m_out: ``F.relu(m_out - Ec_out)``.) Defaults: CIFAR-10 WRN-40-2, λ=0.1.
    """

    name = "energy"
    needs_outliers = True

    def __init__(self, m_in: float = -23.0, m_out: float = -5.0, weight: float = 0.1) -> None:
        super().__init__()
        _check_margins(m_in, m_out)
        self.m_in, self.m_out = float(m_in), float(m_out)
        self.weight = _check_weight(weight, "energy")

    def forward(self, inp: LossInputs) -> Tensor:
        logits_out = require_input(inp.logits_out, self.name, "logits_out")
        out_hinge = mean_or_zero(squared_hinge(self.m_out - energy(logits_out)))
        return self.weight * (energy_in_hinge(inp, self.m_in) + out_hinge)


Reduction = Literal["normalized", "mean"]


class BalancedEnergy(LossTerm):
    """Balanced energy regularisation (Choi, Jeong & Choi, CVPR 2023), T=1:

        λ · [ mean_in max(0, E(x_in) - m_in)²  +  L_out,bal ]
        Z_γ(x)   = Σ_j softmax_j(f(x)) · P_γ(y=j|o)                 (see :func:`outlier_affinity`)
        L_out,bal = Σ_out max(0, m_out + α·Z_γ - E(x_out))² · Z_γ  /  Σ_out Z_γ      (reduction="normalized")

    Outliers that look like a majority outlier class (high Z_γ) get a larger margin (m_out + α·Z_γ) and a
    larger weight than minority-class outliers. With α=0 and a uniform prior (Z ≡ 1/K) L_out,bal is exactly
    the Energy out-hinge mean max(0, m_out - E)².

    What the authors' reference implementation does (github.com/hyunjunChhoi/Balanced_Energy, commit
    aad4a7a, ``classification/inf_train_im_wide.py`` (CIFAR-LT, WRN) and ``classification/inf_train_res.py``,
    ``train()``, ``args.score == 'energy'``)::

        Ec_out = -logsumexp(x_out) - lamb * Z1
        loss += 0.1 * (relu(Ec_in - m_in)².mean() + (relu(m_out - Ec_out)² * Z2).sum() / Z2.sum())

    (a) the outlier term is the Z-weighted average Σ h²·Z / Σ Z (the slides' E[h²·Z] would be
        ``reduction="mean"``, i.e. mean(h²·Z), which is ≈K times smaller for a near-uniform Z);
    (b) Z is NOT detached: it is ``softmax(x)`` of the live logits, so gradients flow through both the
        margin shift and the weight (``detach_z=True`` stops them);
    (c) sign: max(0, m_out + α·Z - E)², outlier energy pushed above the shifted margin (the slide's
        ``E - m_out - αZ`` has the Energy-slide typo);
    (d) the in-hinge and the out-term are both scaled by 0.1, as in EnergyOE;
    (e) the code has separate γ for the margin (``gamma1``, Z1) and for the weight (``gamma2``, Z2); all
        published run scripts set them equal. ``weight_prior`` exposes Z2 (default: the same prior).
    Reference run settings: CIFAR-10 m_in=-23, m_out=-5, α(lamb)=10, γ=0.05 (``inf_run_res.sh``) or γ=0.5
    (CIFAR-10-LT, ``inf_run_im_wide.sh``); CIFAR-100 m_in=-27, m_out=-5, α=100, γ=0.005 / 0.5 (LT).

    ``prior_gamma`` is P_γ(y|o) (see :mod:`oodtune.losses.prior`); it is L1-normalised here (as the reference does
    with ``F.normalize(p=1)``), so an unnormalised P^γ is accepted too.
    """

    name = "balanced_energy"
    needs_outliers = True

    def __init__(self, prior_gamma: Tensor | Sequence[float], m_in: float = -23.0, m_out: float = -5.0,
                 alpha: float = 10.0, weight: float = 0.1, *, weight_prior: Tensor | Sequence[float] | None = None,
                 reduction: Reduction = "normalized", detach_z: bool = False) -> None:
        _check_margins(m_in, m_out)
        if not alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        if reduction not in ("normalized", "mean"):
            raise ConfigError(f"reduction must be 'normalized' (reference code) or 'mean' (slides), got {reduction!r}")
        super().__init__()
        prior = self._normalized_prior(prior_gamma, "prior_gamma")
        w_prior = prior if weight_prior is None else self._normalized_prior(weight_prior, "weight_prior")
        if w_prior.shape != prior.shape:
            raise ConfigError(f"weight_prior has {w_prior.numel()} classes, prior_gamma {prior.numel()}")
        # float64 buffers: .to(device) moves them once; each step casts them to the logits' dtype on the device
        self.prior: Tensor
        self.weight_prior: Tensor
        self.register_buffer("prior", prior)
        self.register_buffer("weight_prior", w_prior)
        self._shared_prior = weight_prior is None
        self.m_in, self.m_out, self.alpha = float(m_in), float(m_out), float(alpha)
        self.weight = _check_weight(weight, "balanced energy")
        self.reduction: Reduction = reduction
        self.detach_z = bool(detach_z)

    @staticmethod
    def _normalized_prior(prior: Tensor | Sequence[float], what: str) -> Tensor:
        p = torch.as_tensor(prior, dtype=torch.float64).detach().cpu()
        if p.ndim != 1 or p.numel() == 0:
            raise ConfigError(f"{what} must be a 1-D tensor with one entry per class, got shape {tuple(p.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ConfigError(f"{what} must be finite, non-negative and not all zero, got {p.tolist()}")
        return p / p.sum()

    def affinities(self, logits_out: Tensor) -> tuple[Tensor, Tensor]:
        """(Z for the margin shift, Z for the weight), per outlier, honouring ``detach_z``."""
        if logits_out.shape[1] != self.prior.numel():
            raise ConfigError(f"prior_gamma has {self.prior.numel()} classes but the logits have "
                              f"{logits_out.shape[1]}; "
                             "re-run the prior estimation with this model.")
        x = as_float(logits_out)
        z_margin = outlier_affinity(x, self.prior)
        z_weight = z_margin if self._shared_prior else outlier_affinity(x, self.weight_prior)
        if self.detach_z:
            return z_margin.detach(), z_weight.detach()
        return z_margin, z_weight

    def outlier_term(self, logits_out: Tensor) -> Tensor:
        """L_out,bal (unweighted by λ)."""
        z_margin, z_weight = self.affinities(logits_out)
        per_sample = squared_hinge(self.m_out + self.alpha * z_margin - energy(logits_out)) * z_weight
        if self.reduction == "mean":
            return mean_or_zero(per_sample)
        return per_sample.sum() / z_weight.sum().clamp_min(torch.finfo(z_weight.dtype).tiny)

    def forward(self, inp: LossInputs) -> Tensor:
        logits_out = require_input(inp.logits_out, self.name, "logits_out")
        return self.weight * (energy_in_hinge(inp, self.m_in) + self.outlier_term(logits_out))


class Sparsity(LossTerm):
    """λ · mean over ID samples of ||g(x_in)||₁ on the penultimate features (Chen & Li 2023).

    Paper: λ=0.001 (10 epochs, lr 1e-3); the public code used λ=0.02.
    """

    name = "sparsity"
    needs_features = True

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__()
        self.weight = _check_weight(weight, "sparsity")

    def forward(self, inp: LossInputs) -> Tensor:
        feats = require_input(inp.features_in, self.name, "features_in")
        return self.weight * as_float(feats).flatten(1).abs().sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------- composite
class CompositeLoss(nn.Module):
    """Sum of loss terms (an ``nn.Module`` holding them). ``loss(inp) -> (total, parts)``; ``parts[name]`` is
    each term's detached value.

    ``check_finite`` (default on) raises :class:`~oodtune.errors.DivergenceError` as soon as the total is
    NaN/inf; it costs one device sync per step.
    """

    terms: Sequence[LossTerm]  # an nn.ModuleList at run time

    def __init__(self, terms: Sequence[LossTerm], *, check_finite: bool = True) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)  # type: ignore[assignment]
        if not self.terms:
            raise ConfigError("CompositeLoss needs at least one term")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate loss terms: {names}")
        self.check_finite = check_finite

    @property
    def needs_outliers(self) -> bool:
        return any(t.needs_outliers for t in self.terms)

    @property
    def needs_features(self) -> bool:
        return any(t.needs_features for t in self.terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def forward(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        values = {t.name: t(inp) for t in self.terms}
        total = torch.stack(list(values.values())).sum()
        parts = {k: v.detach() for k, v in values.items()}
        if self.check_finite and not bool(torch.isfinite(total)):
            bad = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            error = DivergenceError(
                f"non-finite loss ({bad}). The learning rate is probably too high, or the energy margins "
                "m_in/m_out are far from the model's energies (see `oodtune propose-margins`)."
            )
            error.terms = {k: float(v) for k, v in parts.items()}
            raise error
        return total, parts


# ----------------------------------------------------------------------------------------------- methods
#: base methods -> their extra terms (CE is always first).
METHODS: dict[str, tuple[type[LossTerm], ...]] = {
    "ce": (),
    "oe": (OutlierExposure,),
    "energy-oe": (EnergyHinge,),
    "balanced-energy": (BalancedEnergy,),
    "sparsity": (Sparsity,),
}

#: ``build_method_loss`` option (a :data:`~oodtune.losses.options.LOSS_OPTIONS` name) -> {term class: constructor
#: argument}.
TERM_ARGUMENTS: dict[str, dict[type[LossTerm], str]] = {
    "m_in": {EnergyHinge: "m_in", BalancedEnergy: "m_in"},
    "m_out": {EnergyHinge: "m_out", BalancedEnergy: "m_out"},
    "energy_weight": {EnergyHinge: "weight", BalancedEnergy: "weight"},
    "alpha": {BalancedEnergy: "alpha"},
    "balanced_reduction": {BalancedEnergy: "reduction"},
    "detach_z": {BalancedEnergy: "detach_z"},
    "oe_weight": {OutlierExposure: "weight"},
    "sparsity_weight": {Sparsity: "weight"},
}


def _signature_default(option: str) -> Any:
    """The default of ``option``, read from the signatures of the terms that take it (they must agree)."""
    values = {cls: inspect.signature(cls.__init__).parameters[arg].default
              for cls, arg in TERM_ARGUMENTS[option].items()}
    if len({repr(v) for v in values.values()}) != 1:
        raise TypeError(f"loss terms disagree on the default of {option}: {values}")
    return next(iter(values.values()))


#: The classification loss registry: the methods and the default of every option they take.
CLASSIFICATION_LOSSES = TaskLosses(
    task="classification", methods=tuple(METHODS),
    defaults={option: _signature_default(option) for option in TERM_ARGUMENTS},
    methods_help=f"{', '.join(m for m in METHODS if m != 'ce')}, or a '+'-composition such as "
                 "balanced-energy+sparsity",
)


def _method_terms(method: str) -> list[type[LossTerm]]:
    parts = [p.strip().lower().replace("_", "-") for p in method.split("+")]
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not parts:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}, or a '+' composition of them "
                         "such as 'balanced-energy+sparsity'.")
    classes: list[type[LossTerm]] = [CrossEntropy]
    for p in parts:
        classes += [c for c in METHODS[p] if c not in classes]
    return classes


def _term_kwargs(cls: type[LossTerm], overrides: dict[str, Any]) -> dict[str, Any]:
    return {TERM_ARGUMENTS[k][cls]: v for k, v in overrides.items() if cls in TERM_ARGUMENTS[k]}


def build_method_loss(method: str, *, prior_gamma: Tensor | Sequence[float] | None = None,
                      check_finite: bool = True, **overrides: Any) -> CompositeLoss:
    """The CompositeLoss of ``method`` (see the module table) with reference defaults.

    ``overrides`` (names in :data:`TERM_ARGUMENTS`: m_in, m_out, energy_weight, alpha, oe_weight, sparsity_weight,
    balanced_reduction, detach_z) replace defaults; an option the method does not use is an error (it is
    almost always a typo or the wrong method). ``prior_gamma`` (P_γ(y|o) from the prior-estimation step)
    is required by, and only accepted for, methods with Balanced Energy.
    """
    classes = _method_terms(method)
    unknown = sorted(set(overrides) - set(TERM_ARGUMENTS))
    if unknown:
        raise ConfigError(f"unknown loss option(s) {unknown}; valid: {', '.join(TERM_ARGUMENTS)}")
    unused = sorted(k for k in overrides if not any(c in TERM_ARGUMENTS[k] for c in classes))
    if unused:
        raise ConfigError(f"loss option(s) {unused} do not apply to method {method!r} "
                         f"(terms: {', '.join(c.name for c in classes)})")
    uses_prior = BalancedEnergy in classes
    if uses_prior and prior_gamma is None:
        raise ConfigError(f"method {method!r} needs the outlier class prior P_γ(y|o). Run the prior-estimation step "
                         "first (`oodtune estimate-prior CHECKPOINT --out prior.json`, Balanced Energy step 1) and "
                         "pass it (--prior prior.json / prior_gamma=OutlierPrior.load(...).gamma_prior()).")
    if not uses_prior and prior_gamma is not None:
        raise ConfigError(f"a prior was given but method {method!r} does not use it (only balanced-energy does).")
    def make(cls: type[LossTerm]) -> LossTerm:
        kwargs = _term_kwargs(cls, overrides)
        return BalancedEnergy(prior_gamma, **kwargs) if cls is BalancedEnergy else cls(**kwargs)  # type: ignore[arg-type]

    terms = [make(c) for c in classes]
    return CompositeLoss(terms, check_finite=check_finite)
