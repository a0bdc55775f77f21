"""Loss terms pinned on hand-computed values, gradients and directions; method building; margins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from oodtune.functional import energy
from oodtune.losses.margins import margin_coverage, propose_margins
from oodtune.losses.terms import (
    TERM_ARGUMENTS,
    BalancedEnergy,
    CompositeLoss,
    CrossEntropy,
    EnergyHinge,
    LossInputs,
    OutlierExposure,
    Sparsity,
    build_method_loss,
    outlier_affinity,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def const_logits(energies: list[float], k: int = 2) -> torch.Tensor:
    """Rows of k equal logits c with -log(k e^c) = E, i.e. c = -E - ln k."""
    return torch.tensor([[-e - math.log(k)] * k for e in energies], dtype=torch.float64)


def inputs(logits_in=None, labels=None, feats=None, logits_out=None) -> LossInputs:
    logits_in = const_logits([-20.0]) if logits_in is None else logits_in
    labels = torch.zeros(len(logits_in), dtype=torch.int64) if labels is None else labels
    return LossInputs(logits_in=logits_in, labels_in=labels, features_in=feats, logits_out=logits_out)


# ------------------------------------------------------------------------------------------ values
def test_energy_keeps_float64_for_gradchecks():
    x = torch.randn(5, 7)
    assert energy(x.double()).dtype == torch.float64
    torch.testing.assert_close(energy(const_logits([-3.0, 2.5], k=4)), torch.tensor([-3.0, 2.5], dtype=torch.float64))


def test_cross_entropy_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]; label 1 -> -ln(3/4)
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    out = CrossEntropy()(inputs(logits, torch.tensor([1, 0])))
    assert out.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)


def test_outlier_exposure_hand_value():
    # H(u; [1/4, 3/4]) = -(ln 1/4 + ln 3/4)/2 = ln 4 - ln(3)/2 ; uniform softmax -> H(u; u) = ln K = ln 2
    logits_out = torch.tensor([[0.0, LN3], [5.0, 5.0]])
    out = OutlierExposure()(inputs(logits_out=logits_out))
    assert out.item() == pytest.approx(0.5 * ((LN4 - LN3 / 2) + LN2) / 2, rel=1e-6)
    one = OutlierExposure(weight=1.0)(inputs(logits_out=logits_out[:1])).item()
    assert one == pytest.approx(LN4 - LN3 / 2, rel=1e-6)


def test_energy_hinge_hand_value():
    # m_in=-23: E_in=-20 -> 3^2=9, E_in=-25 -> 0 (mean 4.5); m_out=-5: E_out=-8 -> 9, E_out=-2 -> 0 (mean 4.5)
    inp = inputs(const_logits([-20.0, -25.0]), logits_out=const_logits([-8.0, -2.0]))
    assert EnergyHinge()(inp).item() == pytest.approx(0.1 * (4.5 + 4.5))


def test_energy_out_hinge_direction():
    """The out hinge penalises outlier energy BELOW m_out (Energy paper/code), not above (slide typo)."""
    term = EnergyHinge(m_in=-23.0, m_out=-5.0, weight=1.0)
    loss_at = lambda e_out: term(inputs(const_logits([-30.0]), logits_out=const_logits([e_out]))).item()  # noqa: E731
    assert loss_at(-4.0) == 0.0 and loss_at(-5.0) == 0.0  # at/above m_out: no loss
    assert 0 < loss_at(-6.0) < loss_at(-8.0)  # lowering E_out increases the loss
    assert loss_at(-8.0) == pytest.approx(9.0)
    # the gradient w.r.t. outlier logits is positive, so a descent step lowers the logits and raises E_out
    logits_out = torch.tensor([[7.0, 9.0, 8.0]], dtype=torch.float64, requires_grad=True)  # E ≈ -9.4 < m_out
    term(inputs(const_logits([-30.0], k=3), logits_out=logits_out)).backward()
    assert (logits_out.grad > 0).all()
    stepped = (logits_out - 0.1 * logits_out.grad).detach()
    assert energy(stepped).item() > energy(logits_out.detach()).item()


def test_energy_in_hinge_direction():
    logits_in = torch.tensor([[2.0, 4.0, 3.0]], dtype=torch.float64, requires_grad=True)
    EnergyHinge(m_in=-23.0, m_out=-5.0)(inputs(logits_in, logits_out=const_logits([0.0], k=3))).backward()
    assert (logits_in.grad < 0).all()  # descent raises the logits -> lowers E_in


PRIOR = torch.tensor([0.75, 0.25])


def balanced_outliers() -> torch.Tensor:
    """Two outliers with E = -8: A has softmax [1/4, 3/4] (Z = 3/8), B has [3/4, 1/4] (Z = 5/8) under PRIOR."""
    c = 8.0 - LN4
    return torch.tensor([[c, c + LN3], [c + LN3, c]], dtype=torch.float64)


def test_outlier_affinity_hand_value():
    expected = torch.tensor([0.375, 0.625], dtype=torch.float64)
    torch.testing.assert_close(outlier_affinity(balanced_outliers(), PRIOR), expected)


def test_balanced_energy_hand_value():
    # margins -5 + 10 Z = -1.25 / 1.25 ; h = margin + 8 = 6.75 / 9.25 ; Σ h² Z / Σ Z (Σ Z = 1)
    expected_out = 6.75**2 * 0.375 + 9.25**2 * 0.625  # 70.5625
    inp = inputs(const_logits([-20.0]), logits_out=balanced_outliers())
    assert BalancedEnergy(PRIOR)(inp).item() == pytest.approx(0.1 * (9.0 + expected_out))
    assert BalancedEnergy(PRIOR, reduction="mean")(inp).item() == pytest.approx(0.1 * (9.0 + expected_out / 2))
    # the prior is L1-normalised: unnormalised counts give the same loss
    assert BalancedEnergy(torch.tensor([3.0, 1.0]))(inp).item() == pytest.approx(0.1 * (9.0 + expected_out))


def test_balanced_energy_majority_outliers_get_larger_margin_and_weight():
    term = BalancedEnergy(PRIOR, weight=1.0)
    z_margin, z_weight = term.affinities(balanced_outliers())
    assert z_margin[1] > z_margin[0] and z_weight[1] > z_weight[0]  # B resembles majority class 0
    per = [term.outlier_term(balanced_outliers()[i:i + 1]).item() for i in range(2)]
    assert per == [pytest.approx(6.75**2), pytest.approx(9.25**2)]  # margin -5+10Z larger for B
    # B stays penalised at energies where A already satisfies its margin
    a, b = balanced_outliers()
    shift = -1.25 + 0.5 + 8.0  # raise both energies to -0.75: above A's margin (-1.25), below B's (1.25)
    assert term.outlier_term((a - shift)[None]).item() == 0.0
    assert term.outlier_term((b - shift)[None]).item() == pytest.approx(2.0**2)


def test_balanced_energy_reduces_to_energy_hinge_with_uniform_prior_and_no_shift():
    torch.manual_seed(0)
    logits_in, logits_out = torch.randn(6, 5) * 3, torch.randn(9, 5) * 3
    inp = inputs(logits_in, torch.zeros(6, dtype=torch.int64), logits_out=logits_out)
    uniform = torch.full((5,), 0.2)
    energy_term = EnergyHinge(m_in=-2.0, m_out=1.0)
    torch.testing.assert_close(BalancedEnergy(uniform, m_in=-2.0, m_out=1.0, alpha=0.0)(inp), energy_term(inp))
    # numpy reference of both hinge parts
    e_in, e_out = -logsumexp(logits_in.numpy(), axis=1), -logsumexp(logits_out.numpy(), axis=1)
    in_part = np.mean(np.maximum(0, e_in + 2.0) ** 2)
    out_part = np.mean(np.maximum(0, 1.0 - e_out) ** 2)
    assert energy_term(inp).item() == pytest.approx(0.1 * (in_part + out_part), rel=1e-5)
    # the slides' reduction E[h² Z] differs only by the constant weight Z = 1/K on the out term
    mean_red = BalancedEnergy(uniform, m_in=-2.0, m_out=1.0, alpha=0.0, weight=1.0, reduction="mean")(inp)
    assert mean_red.item() == pytest.approx(in_part + out_part / 5, rel=1e-5)


def test_balanced_energy_gradient_flows_through_z_unless_detached():
    logits_out = balanced_outliers().requires_grad_(True)
    inp = inputs(const_logits([-30.0]), logits_out=logits_out)
    g_live = torch.autograd.grad(BalancedEnergy(PRIOR)(inp), logits_out)[0]
    g_detached = torch.autograd.grad(BalancedEnergy(PRIOR, detach_z=True)(inp), logits_out)[0]
    assert not torch.allclose(g_live, g_detached)
    # detached: the gradient is that of Σ w_i relu(m_i - E_i)² / Σ w with constant m_i, w_i
    z = torch.tensor([0.375, 0.625], dtype=torch.float64)
    h = -5 + 10 * z + 8.0
    soft = torch.softmax(balanced_outliers(), dim=1)
    expected = 0.1 * (2 * h * z)[:, None] * soft  # dL/dE_i = -2 h_i z_i, dE/df = -softmax
    torch.testing.assert_close(g_detached, expected)


def test_sparsity_hand_value():
    feats = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]])
    assert Sparsity()(inputs(const_logits([-1.0, -1.0]), feats=feats)).item() == pytest.approx(1e-3 * 3.5)
    assert Sparsity(weight=0.02)(inputs(const_logits([-1.0, -1.0]), feats=feats)).item() == pytest.approx(0.07)


# ------------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("term", [
    CrossEntropy(), OutlierExposure(), EnergyHinge(m_in=-5.0, m_out=5.0),
    BalancedEnergy(torch.tensor([0.5, 0.2, 0.2, 0.1]), m_in=-5.0, m_out=5.0, alpha=2.0),
    BalancedEnergy(torch.tensor([0.5, 0.2, 0.2, 0.1]), m_in=-5.0, m_out=5.0, alpha=2.0, reduction="mean"),
], ids=lambda t: repr(t)[:40])
def test_gradcheck_logits(term):
    gen = torch.Generator().manual_seed(1)
    logits_in = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    logits_out = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(lambda a, b: term(LossInputs(a, labels, None, b)), (logits_in, logits_out))


def test_gradcheck_sparsity():
    feats = (torch.rand(3, 6, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0] * 3, dtype=torch.float64)
    feats.requires_grad_(True)
    logits = const_logits([0.0] * 3)
    labels = torch.zeros(3, dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda f: Sparsity()(LossInputs(logits, labels, f)), (feats,))


# ------------------------------------------------------------------------------------------ properties
logit_rows = st.lists(st.lists(st.floats(-30, 30), min_size=3, max_size=3), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(logit_rows)
def test_oe_minimum_is_log_k_at_uniform_softmax(rows):
    x = torch.tensor(rows, dtype=torch.float64)
    oe = OutlierExposure(weight=1.0)(inputs(logits_out=x)).item()
    assert oe >= LN3 - 1e-12  # H(u; p) >= H(u) = ln K
    uniform = OutlierExposure(weight=1.0)(inputs(logits_out=x[:, :1].expand(-1, 3))).item()
    assert uniform == pytest.approx(LN3, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(logit_rows, st.floats(-10, 0), st.floats(0.1, 10))
def test_balanced_energy_alpha0_uniform_equals_energy_hinge(rows, m_in, gap):
    x = torch.tensor(rows, dtype=torch.float64)
    inp = inputs(x, torch.zeros(len(x), dtype=torch.int64), logits_out=x.flip(0))
    a = BalancedEnergy(torch.ones(3), m_in=m_in, m_out=m_in + gap, alpha=0.0)(inp)
    b = EnergyHinge(m_in=m_in, m_out=m_in + gap)(inp)
    torch.testing.assert_close(a, b)


def test_bf16_logits_computed_in_float32():
    x = torch.randn(4, 10).bfloat16()
    out = torch.randn(6, 10).bfloat16()
    loss = build_method_loss("balanced-energy", prior_gamma=torch.ones(10))
    total, parts = loss(LossInputs(x, torch.arange(4), None, out))
    assert total.dtype == torch.float32
    ref, _ = loss(LossInputs(x.float(), torch.arange(4), None, out.float()))
    torch.testing.assert_close(total, ref)


# ------------------------------------------------------------------------------------------ composite
def test_composite_sums_parts_and_flags():
    feats = torch.tensor([[1.0, -2.0, 0.0]])
    inp = inputs(torch.tensor([[30.0, 30.0 + LN3]]), torch.tensor([1]), feats, const_logits([-8.0]))  # E_in < m_in
    loss = CompositeLoss([CrossEntropy(), EnergyHinge(), Sparsity()])
    total, parts = loss(inp)
    assert list(parts) == ["ce", "energy", "sparsity"]
    assert all(not v.requires_grad for v in parts.values())
    assert total.item() == pytest.approx(math.log(4 / 3) + 0.1 * (0 + 9.0) + 3e-3, rel=1e-6)
    assert loss.needs_outliers and loss.needs_features
    ce_only = CompositeLoss([CrossEntropy()])
    assert not ce_only.needs_outliers and not ce_only.needs_features
    with pytest.raises(ValueError, match="duplicate"):
        CompositeLoss([CrossEntropy(), CrossEntropy()])


def test_composite_raises_on_nan_with_hint():
    bad = torch.tensor([[float("nan"), 0.0]])
    with pytest.raises(FloatingPointError, match="learning rate"):
        build_method_loss("ce")(inputs(bad, torch.tensor([0])))


def test_missing_outliers_or_features_is_a_clear_error():
    with pytest.raises(ValueError, match="logits_out"):
        EnergyHinge()(inputs())
    with pytest.raises(ValueError, match="features_in"):
        Sparsity()(inputs())


# ------------------------------------------------------------------------------------------ build_method_loss
@pytest.mark.parametrize("method,names,outliers,features", [
    ("ce", ["ce"], False, False),
    ("oe", ["ce", "oe"], True, False),
    ("energy-oe", ["ce", "energy"], True, False),
    ("balanced-energy", ["ce", "balanced_energy"], True, False),
    ("sparsity", ["ce", "sparsity"], False, True),
    ("balanced-energy+sparsity", ["ce", "balanced_energy", "sparsity"], True, True),
    ("oe+sparsity", ["ce", "oe", "sparsity"], True, True),
    ("Energy_OE", ["ce", "energy"], True, False),
])
def test_build_method_loss_terms(method, names, outliers, features):
    prior = torch.ones(10) if "balanced" in method else None
    loss = build_method_loss(method, prior_gamma=prior)
    assert loss.names == names
    assert (loss.needs_outliers, loss.needs_features) == (outliers, features)


def test_build_method_loss_defaults_and_overrides():
    terms = {t.name: t for t in build_method_loss("balanced-energy+sparsity", prior_gamma=torch.ones(10)).terms}
    b = terms["balanced_energy"]
    got = (b.m_in, b.m_out, b.alpha, b.weight, b.reduction, b.detach_z)
    assert got == (-23.0, -5.0, 10.0, 0.1, "normalized", False)
    assert terms["sparsity"].weight == 1e-3
    e = build_method_loss("energy-oe").terms[1]
    assert (e.m_in, e.m_out, e.weight) == (-23.0, -5.0, 0.1)
    assert build_method_loss("oe").terms[1].weight == 0.5
    over = build_method_loss("balanced-energy+sparsity", prior_gamma=torch.ones(10), m_in=-27, m_out=-4, alpha=100,
                             energy_weight=0.2, sparsity_weight=0.02, balanced_reduction="mean", detach_z=True)
    b, s = over.terms[1], over.terms[2]
    assert (b.m_in, b.m_out, b.alpha, b.weight, b.reduction, b.detach_z, s.weight) == (
        -27.0, -4.0, 100.0, 0.2, "mean", True, 0.02)
    assert set(TERM_ARGUMENTS) >= {"m_in", "m_out", "alpha", "energy_weight", "oe_weight", "sparsity_weight"}


def test_build_method_loss_errors():
    with pytest.raises(ValueError, match="balanced-energy, sparsity"):
        build_method_loss("energy")
    with pytest.raises(ValueError, match="estimate-prior"):
        build_method_loss("balanced-energy")
    with pytest.raises(ValueError, match="does not use it"):
        build_method_loss("energy-oe", prior_gamma=torch.ones(10))
    with pytest.raises(ValueError, match="do not apply"):
        build_method_loss("energy-oe", alpha=5.0)
    with pytest.raises(ValueError, match="unknown loss option"):
        build_method_loss("oe", oe_wieght=1.0)
    with pytest.raises(ValueError, match="m_in < m_out"):
        build_method_loss("energy-oe", m_in=-5.0, m_out=-23.0)
    with pytest.raises(ValueError, match="non-negative"):
        BalancedEnergy(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="re-run the prior"):
        BalancedEnergy(torch.ones(3))(inputs(logits_out=const_logits([-8.0])))


# ------------------------------------------------------------------------------------------ margins
def test_propose_margins_quantiles():
    id_e, out_e = torch.arange(-20.0, -9.0), np.arange(-10.0, 1.0)  # -20..-10, -10..0
    assert propose_margins(id_e, out_e) == (pytest.approx(-19.0), pytest.approx(-1.0))
    medians = propose_margins(id_e, out_e, id_quantile=0.5, out_quantile=0.5)
    assert medians == (pytest.approx(-15.0), pytest.approx(-5.0))
    m_in, m_out = propose_margins(id_e, out_e)
    assert margin_coverage(id_e, out_e, m_in, m_out) == (pytest.approx(9 / 11), pytest.approx(9 / 11))


def test_propose_margins_widens_crossed_quantiles():
    widened = propose_margins(np.full(5, -5.0), np.full(5, -6.0), min_gap=1.0)
    assert widened == (pytest.approx(-6.0), pytest.approx(-5.0))
    with pytest.raises(ValueError, match="NaN"):
        propose_margins(np.array([np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="id_quantile"):
        propose_margins(np.zeros(2), np.zeros(2), id_quantile=1.5)


def test_loss_options_are_defined_once_with_each_tasks_defaults() -> None:
    """One table of options; per task the defaults its builders use, shown by the command line's help."""
    from click.testing import CliRunner

    from oodtune.benchmark.config import LOSS_TYPES
    from oodtune.cli import main
    from oodtune.losses import LOSS_OPTIONS, TASK_LOSSES, build_pixel_loss

    cls, seg = TASK_LOSSES["classification"], TASK_LOSSES["segmentation"]
    assert set(cls.defaults) == set(TERM_ARGUMENTS) and set(cls.defaults) | set(seg.defaults) == set(LOSS_OPTIONS)
    assert set(seg.defaults) - set(cls.defaults) == {"smooth_normalization"}  # PEBAL's smoothness: pixels only
    assert set(LOSS_TYPES) == set(LOSS_OPTIONS) and LOSS_TYPES["m_in"] == (float, str)
    hinge = build_method_loss("energy-oe").terms[1]
    assert (cls.defaults["m_in"], cls.defaults["m_out"]) == (hinge.m_in, hinge.m_out) == (-23.0, -5.0)
    pixel_hinge = build_pixel_loss("energy-oe", num_classes=3, ignore_index=None).terms[1]
    assert (seg.defaults["m_in"], seg.defaults["m_out"]) == (pixel_hinge.m_in, pixel_hinge.m_out) == (-12.0, -6.0)
    help_text = " ".join(CliRunner().invoke(main, ["finetune", "--help"], terminal_width=200).output.split())
    assert "[default: -23.0 for classification, -12.0 for segmentation]" in help_text
    assert "--oe-weight FLOAT OE weight λ. [classification only; default: 0.5]" in help_text
    assert "[segmentation only; default: reference]" in help_text
    assert all(o.flag in help_text for o in LOSS_OPTIONS.values())
