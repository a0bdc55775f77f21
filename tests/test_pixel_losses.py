"""Pixel losses against independent computations: the Gambler loss against a per-pixel loop written from the
reference formula, the smoothness and energy norm against numpy, the blur against scipy; the methods compose the
documented terms and refuse what does not apply."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from oodtune.errors import ConfigError
from oodtune.functional import channel_argmax, gaussian_blur
from oodtune.losses.pixel import (
    OUTLIER_LABEL,
    EnergySmoothness,
    Gambler,
    OutlierEnergyNorm,
    build_pixel_loss,
)
from oodtune.losses.terms import BalancedEnergy, CrossEntropy, EnergyHinge, LossInputs

K, VOID = 3, 9


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, K + 1, 8, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, K, (3, 8, 9), generator=g)
    labels[0, :2, :3] = VOID
    labels[1, 3:6, 2:5] = OUTLIER_LABEL  # frame 1 carries an outlier, frames 0 and 2 do not
    return logits, labels


def _inputs(logits: torch.Tensor, labels: torch.Tensor) -> LossInputs:
    pix = logits[:, :K].permute(0, 2, 3, 1)
    out = labels == OUTLIER_LABEL
    lab = ~out & (labels != VOID)
    return LossInputs(pix[lab], labels[lab], None, pix[out], logits_map=logits, labels_map=labels)


def _gambler_reference(logits: np.ndarray, labels: np.ndarray, ood_reg: float = 0.1) -> float:
    """The reference formula, pixel by pixel: frames without outliers, then frames with them."""
    b, c, h, w = logits.shape
    energy = np.log(np.exp(logits[:, :K]).sum(1))
    reward = ndimage.gaussian_filter(energy**2, sigma=(0, 1, 1), truncate=3.0, mode="mirror")
    total = 0.0
    for with_out in (False, True):
        frames = [i for i in range(b) if (labels[i] == OUTLIER_LABEL).any() == with_out]
        ins, outs = [], []
        for i in frames:
            for y in range(h):
                for x in range(w):
                    p = np.exp(logits[i, :, y, x]) / np.exp(logits[i, :, y, x]).sum()
                    boost = p[-1] / reward[i, y, x]
                    lab = labels[i, y, x]
                    if lab == OUTLIER_LABEL:
                        outs += [math.log(max(p[j] + boost, 1e-7)) for j in range(K)]
                    elif lab != VOID:
                        ins.append(math.log(p[lab] + boost))
        if frames:
            total -= np.mean(ins) + (ood_reg * np.mean(outs) if outs else 0.0)
    return total


def test_gambler_matches_the_reference_formula() -> None:
    logits, labels = _batch()
    got = Gambler(K, VOID)(_inputs(logits, labels))
    assert float(got) == pytest.approx(_gambler_reference(logits.numpy(), labels.numpy()), rel=1e-9)
    no_out = labels.clone()
    no_out[no_out == OUTLIER_LABEL] = 0
    got = Gambler(K, VOID)(_inputs(logits, no_out))
    assert float(got) == pytest.approx(_gambler_reference(logits.numpy(), no_out.numpy()), rel=1e-9)


def test_gambler_needs_an_abstention_channel() -> None:
    logits, labels = _batch()
    with pytest.raises(ConfigError, match="abstention channel"):
        Gambler(K + 1, VOID)(_inputs(logits, labels))


def test_blur_matches_scipy() -> None:
    x = torch.rand(2, 11, 13, dtype=torch.float64)
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 1, 1), truncate=3.0, mode="mirror")
    np.testing.assert_allclose(gaussian_blur(x).numpy(), want, rtol=1e-10)


def test_smoothness_and_energy_norm_against_numpy() -> None:
    logits, labels = _batch(1)
    e = -np.log(np.exp(logits[:, :K].numpy()).sum(1))
    want = 0.5 * (np.sum(np.diff(e, axis=1) ** 2) + np.sum(np.diff(e, axis=2) ** 2))
    got_sum = EnergySmoothness(K, weight=1.0, normalization="sum")(_inputs(logits, labels))
    assert float(got_sum) == pytest.approx(want, rel=1e-10)
    # the reference normalisation: the sum rescaled to a reference batch of 8 x 900 x 900 pixels
    got_ref = EnergySmoothness(K, weight=1.0)(_inputs(logits, labels))
    assert float(got_ref) == pytest.approx(want * 8 * 900 * 900 / e.size, rel=1e-10)
    with pytest.raises(ConfigError, match="smooth_normalization"):
        EnergySmoothness(K, normalization="mean")
    e_out = e[labels.numpy() == OUTLIER_LABEL]
    got = OutlierEnergyNorm(weight=1.0)(_inputs(logits, labels))
    assert float(got) == pytest.approx(np.linalg.norm(e_out), rel=1e-10)
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    z = (torch.softmax(logits[:, :K], 1).permute(0, 2, 3, 1)[labels == OUTLIER_LABEL] @ prior).numpy()
    shifted = OutlierEnergyNorm(weight=1.0, alpha=5.0, prior_gamma=prior)(_inputs(logits, labels))
    assert float(shifted) == pytest.approx(np.linalg.norm(e_out - 5.0 * z), rel=1e-10)


def test_smooth_normalization_reaches_the_smoothness_term_of_pebal_only() -> None:
    loss = build_pixel_loss("pebal", num_classes=K, ignore_index=None, smooth_normalization="sum")
    assert [t.normalization for t in loss.terms if isinstance(t, EnergySmoothness)] == ["sum"]
    default = build_pixel_loss("pebal", num_classes=K, ignore_index=None)
    assert [t.normalization for t in default.terms if isinstance(t, EnergySmoothness)] == ["reference"]
    with pytest.raises(ConfigError, match="smoothness"):
        build_pixel_loss("energy-oe", num_classes=K, ignore_index=None, smooth_normalization="sum")


def test_pixel_energy_hinge_is_the_classification_term_on_pixels() -> None:
    logits, labels = _batch(2)
    inp = _inputs(logits, labels)
    e = -torch.logsumexp(logits[:, :K], 1)
    out = labels == OUTLIER_LABEL
    lab = ~out & (labels != VOID)
    want = 0.05 * ((e[lab] + 12).clamp_min(0).square().mean() + (-6 - e[out]).clamp_min(0).square().mean())
    got = EnergyHinge(-12, -6, 0.05)(inp)
    torch.testing.assert_close(got, want)
    empty = LossInputs(inp.logits_in, inp.labels_in, None, inp.logits_out[:0])
    assert torch.isfinite(EnergyHinge(-12, -6, 0.05)(empty))  # a batch without outlier pixels


@pytest.mark.parametrize(("method", "terms"), [
    ("ce", [CrossEntropy]),
    ("energy-oe", [CrossEntropy, EnergyHinge]),
    ("balanced-energy", [CrossEntropy, BalancedEnergy]),
    ("pebal", [Gambler, EnergyHinge, OutlierEnergyNorm, EnergySmoothness]),
    ("balanced-pebal", [Gambler, BalancedEnergy, OutlierEnergyNorm, EnergySmoothness]),
])
def test_methods_compose_their_terms(method: str, terms: list[type]) -> None:
    prior = [0.2, 0.3, 0.5] if "balanced" in method else None
    loss = build_pixel_loss(method, num_classes=K, ignore_index=VOID, prior_gamma=prior)
    assert [type(t) for t in loss.terms] == terms
    logits, labels = _batch(3)
    logits.requires_grad_(True)
    total, parts = loss(_inputs(logits, labels))
    total.backward()
    assert torch.isfinite(logits.grad).all() and set(parts) == {t.name for t in loss.terms}
    if method == "balanced-pebal":
        assert loss.terms[1].alpha == 5.0 and loss.terms[2].alpha == 5.0


def test_bad_methods_and_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown segmentation method"):
        build_pixel_loss("oe", num_classes=K, ignore_index=VOID)
    with pytest.raises(ConfigError, match="sparsity_weight"):
        build_pixel_loss("pebal", num_classes=K, ignore_index=VOID, sparsity_weight=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        build_pixel_loss("pebal", num_classes=K, ignore_index=VOID, alpha=1.0)
    with pytest.raises(ConfigError, match="estimate-prior"):
        build_pixel_loss("balanced-pebal", num_classes=K, ignore_index=VOID)
    with pytest.raises(ConfigError, match="does not use it"):
        build_pixel_loss("energy-oe", num_classes=K, ignore_index=VOID, prior_gamma=[1, 1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_argmax_is_argmax_with_its_first_index_on_ties(dtype: torch.dtype) -> None:
    x = torch.randint(-2, 3, (3, 12, 9, 7)).to(dtype)  # integer logits: most pixels have tied maxima
    got = channel_argmax(x)
    assert torch.equal(got, x.argmax(1))
    first = torch.stack([torch.tensor([int(torch.nonzero(x[n, :, i, j] == x[n, :, i, j].max())[0])
                                       for j in range(7)]) for n in range(3) for i in range(9)]).view(3, 9, 7)
    assert torch.equal(got, first)


@pytest.mark.parametrize("method", ["energy-oe", "balanced-energy", "pebal", "balanced-pebal"])
def test_energies_the_trainer_computes_once_give_the_same_loss_and_gradients(method: str) -> None:
    """The segmentation trainer hands the terms the energy map (and its values at the labelled pixels) computed once;
    every method's loss and gradient equal those computed from the logits by each term on its own."""
    logits, labels = _batch(3)
    loss = build_pixel_loss(method, num_classes=K, ignore_index=VOID, m_in=-2.0, m_out=1.0,
                            prior_gamma=[0.5, 0.3, 0.2] if "balanced" in method else None)
    results = []
    for shared in (False, True):
        x = logits.clone().requires_grad_()
        inp = _inputs(x, labels)
        if shared:
            e = -torch.logsumexp(x[:, :K], dim=1)
            inp = dataclasses.replace(inp, energy_map=e, energy_in=e[~(labels == OUTLIER_LABEL) & (labels != VOID)])
        total, _ = loss(inp)
        total.backward()
        results.append((total.detach(), x.grad))
    assert results[1][0].item() == pytest.approx(results[0][0].item(), rel=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
    inp = _inputs(logits, labels)  # the terms read the energies handed to them: shifted ones change the loss
    e = -torch.logsumexp(logits[:, :K], dim=1) + 1.0
    shifted = dataclasses.replace(inp, energy_map=e, energy_in=e[~(labels == OUTLIER_LABEL) & (labels != VOID)])
    assert loss(shifted)[0].item() != pytest.approx(results[0][0].item(), rel=1e-6)
