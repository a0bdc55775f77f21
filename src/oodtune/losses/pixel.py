"""Pixel-wise OOD losses for segmentation: PEBAL, Balanced PEBAL, pixel Energy-OE and Balanced Energy-OE, as
composable :class:`~oodtune.losses.LossTerm` s.

The segmentation trainer hands every term one :class:`~oodtune.losses.LossInputs` per batch: the labelled
in-distribution pixels as rows (``logits_in`` (N_in, K), ``labels_in``), the pasted outlier pixels as rows
(``logits_out`` (N_out, K)), and the whole batch as maps (``logits_map`` (B, C, H, W) with every output channel,
``labels_map`` (B, H, W) holding the class, the ignore value or :data:`OUTLIER_LABEL`). Energies are over the K
class logits only: E = -log Σ_{j<K} exp f_j. So the classification terms apply to pixels unchanged:
:class:`~oodtune.losses.CrossEntropy`, :class:`~oodtune.losses.EnergyHinge` and
:class:`~oodtune.losses.BalancedEnergy` (Z_γ = Σ_j softmax_j · P_γ(j) over the K classes); the terms here need the
maps or PEBAL's extra channel.

==========================  ======================================================================================
method                      terms (defaults: the reference code, tianyu0207/PEBAL ``code/losses.py`` +
                            ``engine/trainer.py``, hyunjunChhoi/Balanced_Energy ``segmentation/code/losses.py``)
==========================  ======================================================================================
``ce``                      pixel CE over the K classes (a control: plain fine-tuning)
``energy-oe``               CE + 0.1·0.5·[mean relu(E_in − m_in)² + mean relu(m_out − E_out)²]
``balanced-energy``         CE + 0.1·0.5·[mean relu(E_in − m_in)² + Σ relu(m_out − (E_out − α·Z_γ))²·Z_γ / Σ Z_γ]
``pebal``                   Gambler + 0.1·{0.5·[hinges as energy-oe] + 5e-4·‖E_out‖₂ + 3e-6·smooth(E)}
``balanced-pebal``          Gambler + 0.1·{0.5·[hinges as balanced-energy] + 5e-4·‖E_out − α·Z_γ‖₂ + 3e-6·smooth(E)}
==========================  ======================================================================================

m_in = −12, m_out = −6 (the reference's, for its WRN-38 Cityscapes model; re-derive them for another model with
``oodtune propose-margins``), α = 5, γ = 3 (the reference's γ1 = γ2; the prior P(y|o) is *estimated*, never
hard-coded as in the reference code). The energy-OE rows are the pixel analogue of the classification Energy-OE
(CE plus the reference's "pure" energy loss); the reference trains them with the Gambler loss instead of CE.
Deviations from the reference, all in the docs: when a batch holds no outlier pixel the reference drops the 0.5
on the in-hinge (we keep it; our batches always hold pasted frames); the Gambler's in-distribution log is clamped
at 1e-7 as its outlier log is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..functional import energy, gaussian_blur
from .options import TaskLosses
from .terms import (
    BalancedEnergy,
    CompositeLoss,
    CrossEntropy,
    EnergyHinge,
    LossInputs,
    LossTerm,
    as_float,
    outlier_affinity,
    require_input,
)

__all__ = ["EnergySmoothness", "Gambler", "OUTLIER_LABEL", "OutlierEnergyNorm", "PIXEL_METHODS",
           "SEGMENTATION_LOSSES", "build_pixel_loss", "needs_abstention"]

#: Label of pasted outlier pixels in ``LossInputs.labels_map`` (PEBAL uses 254 too; 255 is void).
OUTLIER_LABEL = 254
#: PEBAL's reference margins (WRN-38 on Cityscapes).
PEBAL_M_IN, PEBAL_M_OUT = -12.0, -6.0


def _maps(inp: LossInputs, term: str) -> tuple[Tensor, Tensor]:
    return require_input(inp.logits_map, term, "logits_map"), require_input(inp.labels_map, term, "labels_map")


def _energy_map(inp: LossInputs, num_classes: int) -> Tensor:
    """E = -logsumexp over the K class channels of ``inp.logits_map`` (B, H, W), float32: the trainer's
    ``inp.energy_map`` when it computed it once for every term, else computed here."""
    if inp.energy_map is not None:
        return inp.energy_map
    logits = require_input(inp.logits_map, "energy map", "logits_map")
    return -torch.logsumexp(as_float(logits[:, :num_classes]), dim=1)


class Gambler(LossTerm):
    """PEBAL's abstention (Deep Gambler) loss with the reward from the energy map (Tian et al., ECCV 2022):

        p = softmax over all C channels, a = p_last (the abstention channel), r = blur(logsumexp_{j<K} f_j)²
        frames without outliers:  −mean_{labelled} log(p_y + a / r)
        frames with outliers:     −mean_{labelled} log(p_y + a / r)
                                  − ood_reg · mean_{outlier pixels, j<K} log(p_j + a / r)

    The two groups of frames are averaged separately and added, as the reference calls the loss once on the
    frames without and once on the frames with pasted objects. Needs a model with an abstention channel (its last
    output, after the K class logits)."""

    name = "gambler"
    needs_outliers = True

    def __init__(self, num_classes: int, ignore_index: int | None, ood_reg: float = 0.1) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.ood_reg = float(ood_reg)

    def forward(self, inp: LossInputs) -> Tensor:
        logits, labels = _maps(inp, self.name)
        k = self.num_classes
        if logits.shape[1] <= k:
            raise ConfigError(f"the Gambler loss needs an abstention channel after the {k} class logits, but the model "
                              f"has {logits.shape[1]} outputs; use a model with an extra output (PEBAL) or another "
                              "method (energy-oe, balanced-energy).")
        x = as_float(logits)
        prob = torch.softmax(x, dim=1)
        reward = gaussian_blur(_energy_map(inp, k).square())  # logsumexp² = E²
        boost = prob[:, -1] / reward  # (B, H, W)
        p_class = prob[:, :k]  # one slice for both uses: its backward allocates a full-size gradient once
        outlier = labels == OUTLIER_LABEL
        labelled = ~outlier if self.ignore_index is None else ~outlier & (labels != self.ignore_index)
        target = torch.where(labelled, labels, torch.zeros_like(labels))
        p_true = p_class.gather(1, target.unsqueeze(1)).squeeze(1)
        log_in = (p_true + boost).clamp_min(1e-7).log()
        has_out = outlier.flatten(1).any(1)
        total = x.new_zeros(())
        for group in (~has_out, has_out):
            mask = labelled & group.view(-1, 1, 1)
            part = log_in[mask].mean() if mask.any() else x.new_zeros(())
            if group is has_out and bool(has_out.any()):
                # only the outlier pixels' rows (the log of every pixel's K channels would be thrown away)
                out_log = (p_class.permute(0, 2, 3, 1)[outlier] + boost[outlier].unsqueeze(1)).clamp_min(1e-7).log()
                part = part + self.ood_reg * out_log.mean()
            total = total - part
        return total


class OutlierEnergyNorm(LossTerm):
    """λ · ‖E_out − α·Z_γ‖₂ over the outlier pixels (PEBAL's "sparsity" term, λ = 0.1 · 5e-4; with α = 0 the plain
    L2 norm of the outlier energies; Balanced PEBAL shifts them by α·Z_γ as its hinge does)."""

    name = "energy_norm"
    needs_outliers = True

    def __init__(self, weight: float = 5e-5, alpha: float = 0.0,
                 prior_gamma: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.weight, self.alpha = float(weight), float(alpha)
        self.prior: Tensor | None
        self.register_buffer("prior", None if prior_gamma is None
                             else BalancedEnergy._normalized_prior(prior_gamma, "prior_gamma"))

    def forward(self, inp: LossInputs) -> Tensor:
        logits_out = require_input(inp.logits_out, self.name, "logits_out")
        e = energy(logits_out)
        if self.prior is not None and self.alpha:
            e = e - self.alpha * outlier_affinity(logits_out, self.prior)
        return self.weight * torch.linalg.vector_norm(e)


#: Pixels of one reference batch (PEBAL: 8 crops of 900 x 900), over which its smoothness is summed.
REFERENCE_BATCH_PIXELS = 8 * 900 * 900
SMOOTH_NORMALIZATIONS = ("reference", "sum")


class EnergySmoothness(LossTerm):
    """λ · ½ · Σ over the batch of squared differences of the energy map between vertical and horizontal
    neighbours (PEBAL's smoothness, λ = 0.1 · 3e-6).

    The reference *sums* over its batch (8 x 900 x 900 = 6.48M pixels) while the other terms are means, so the
    term's relative weight grows with the pixels per batch. ``normalization``: ``"reference"`` (default) multiplies
    the sum by 6.48M / (pixels of this batch), i.e. λ · 6.48M · (the per-pixel mean), which gives it the
    reference's relative weight at any frame and batch size; ``"sum"`` keeps the plain sum (at 8 x 480x360 frames
    it is 4.7x weaker relative to the other terms than in the reference, at 8 x 320x240 21x weaker)."""

    name = "smoothness"

    def __init__(self, num_classes: int, weight: float = 3e-7, normalization: str = "reference") -> None:
        super().__init__()
        if normalization not in SMOOTH_NORMALIZATIONS:
            raise ConfigError(f"smooth_normalization must be one of {SMOOTH_NORMALIZATIONS}, got {normalization!r}")
        self.num_classes, self.weight, self.normalization = int(num_classes), float(weight), normalization

    def forward(self, inp: LossInputs) -> Tensor:
        _maps(inp, self.name)
        e = _energy_map(inp, self.num_classes)
        dy = (e[:, 1:, :] - e[:, :-1, :]).square().sum()
        dx = (e[:, :, 1:] - e[:, :, :-1]).square().sum()
        scale = REFERENCE_BATCH_PIXELS / e.numel() if self.normalization == "reference" else 1.0
        return self.weight * 0.5 * scale * (dy + dx)


#: method -> (uses CE, uses Gambler, balanced, PEBAL energy extras (norm + smoothness))
PIXEL_METHODS: dict[str, tuple[bool, bool, bool, bool]] = {
    "ce": (True, False, False, False),
    "energy-oe": (True, False, False, False),
    "balanced-energy": (True, False, True, False),
    "pebal": (False, True, False, True),
    "balanced-pebal": (False, True, True, True),
}
#: The segmentation loss registry: the pixel methods and the options ``build_pixel_loss`` accepts, with PEBAL's
#: defaults (names from :data:`oodtune.losses.options.LOSS_OPTIONS`).
SEGMENTATION_LOSSES = TaskLosses(
    task="segmentation", methods=tuple(PIXEL_METHODS),
    defaults={"m_in": PEBAL_M_IN, "m_out": PEBAL_M_OUT, "energy_weight": 0.05, "alpha": 5.0,
              "smooth_normalization": "reference"},
    methods_help=", ".join(PIXEL_METHODS),
)


def needs_abstention(method: str) -> bool:
    """Whether ``method`` needs the model's abstention channel (the Gambler loss)."""
    return PIXEL_METHODS.get(method, (False, False))[1]


def build_pixel_loss(method: str, *, num_classes: int, ignore_index: int | None,
                     prior_gamma: Tensor | Sequence[float] | None = None, check_finite: bool = True,
                     **overrides: Any) -> CompositeLoss:
    """The CompositeLoss of a pixel method (module table) with the reference defaults; ``overrides`` (m_in, m_out,
    energy_weight = the hinges' weight 0.1·0.5, alpha) replace them. Balanced methods need ``prior_gamma``."""
    key = method.strip().lower()
    if key not in PIXEL_METHODS:
        raise ConfigError(f"unknown segmentation method {method!r}; valid: {', '.join(PIXEL_METHODS)}.")
    ce, gambler, balanced, extras = PIXEL_METHODS[key]
    unknown = sorted(set(overrides) - set(SEGMENTATION_LOSSES.defaults))
    if unknown:
        raise ConfigError(f"loss option(s) {unknown} do not apply to segmentation methods; valid: "
                          f"{', '.join(SEGMENTATION_LOSSES.defaults)}")
    if key == "ce" and overrides:
        raise ConfigError(f"loss option(s) {sorted(overrides)} do not apply to method 'ce' (plain cross-entropy).")
    if "alpha" in overrides and not balanced:
        raise ConfigError(f"alpha is the Balanced Energy margin scale; method {method!r} does not use it.")
    if "smooth_normalization" in overrides and not extras:
        raise ConfigError(f"smooth_normalization applies to PEBAL's smoothness term; method {method!r} has none "
                          "(pebal / balanced-pebal do).")
    if balanced and prior_gamma is None:
        raise ConfigError(f"method {method!r} needs the outlier class prior P_γ(y|o). Run `oodtune estimate-prior "
                          "CHECKPOINT --outliers coco-objects --out prior.json` first and pass --prior prior.json.")
    if not balanced and prior_gamma is not None:
        raise ConfigError(f"a prior was given but method {method!r} does not use it (only balanced-* methods do).")
    o = {**SEGMENTATION_LOSSES.defaults, **overrides}
    terms: list[LossTerm] = [CrossEntropy()] if ce else [Gambler(num_classes, ignore_index)]
    if key != "ce":
        if balanced:
            terms.append(BalancedEnergy(prior_gamma, m_in=o["m_in"], m_out=o["m_out"], alpha=o["alpha"],  # type: ignore[arg-type]
                                        weight=o["energy_weight"]))
        else:
            terms.append(EnergyHinge(m_in=o["m_in"], m_out=o["m_out"], weight=o["energy_weight"]))
    if extras:
        terms.append(OutlierEnergyNorm(alpha=o["alpha"] if balanced else 0.0, prior_gamma=prior_gamma))
        terms.append(EnergySmoothness(num_classes, normalization=o["smooth_normalization"]))
    return CompositeLoss(terms, check_finite=check_finite)
