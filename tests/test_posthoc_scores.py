"""The modern post-hoc scores (GEN, KL matching, ViM, Residual, ReAct, ASH-S/-B/-P, DICE) against hand-computed
values on tiny models and independent numpy/scikit-learn versions of the official code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from oodtune.errors import ConfigError, ScoreError
from oodtune.models.features import FeatureModel
from oodtune.scores import (
    ASH,
    DICE,
    GEN,
    MSP,
    SCORE_NAMES,
    Energy,
    KLMatching,
    ReAct,
    Residual,
    Score,
    Shaped,
    ViM,
    build_score,
)

# A tiny head: 4 features -> 2 classes.
W = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
B = torch.tensor([0.0, 0.5])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def lse(*values: float) -> float:
    """log sum exp, by hand."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _logits(g: torch.Tensor, w: torch.Tensor = W, b: torch.Tensor = B) -> torch.Tensor:
    return g @ w.T + b


# ----------------------------------------------------------------------------- shaping: hand-computed


def test_react_energy_by_hand():
    train = torch.arange(1.0, 21.0).reshape(5, 4)  # activations 1..20: np.percentile(.., 90) = 1 + 0.9 * 19 = 18.1
    score = build_score("react+energy").use_head(W, B).fit(_logits(train), train, torch.zeros(5))
    assert isinstance(score, Shaped) and isinstance(score.shapers[0], ReAct)
    assert score.shapers[0].threshold == pytest.approx(18.1)
    g = torch.tensor([[20.0, 1.0, 2.0, 3.0]])  # clipped to [18.1, 1, 2, 3] -> logits [20.1, 4.5]
    assert float(score.from_outputs(_logits(g), g)) == pytest.approx(lse(20.1, 4.5), rel=1e-6)
    below = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # nothing above the threshold: plain energy
    assert float(score.from_outputs(_logits(below), below)) == pytest.approx(lse(4.0, 6.5), rel=1e-6)


@pytest.mark.parametrize(("variant", "logits"), [
    ("p", (7.0, 0.5)),  # keep the top 2 of [4, 1, 3, 2] -> [4, 0, 3, 0]
    ("b", (10.0, 0.5)),  # kept ones set to s1 / k = 10 / 2 -> [5, 0, 5, 0]
    ("s", (7.0 * math.exp(10 / 7), 0.5)),  # [4, 0, 3, 0] * exp(s1 / s2) = exp(10 / 7)
])
def test_ash_by_hand(variant, logits):
    g = torch.tensor([[4.0, 1.0, 3.0, 2.0]])  # D = 4, prune 50% -> k = 4 - round(2) = 2
    score = build_score(f"ash-{variant}+energy", prune_percentile=50).use_head(W, B)
    assert not score.needs_fit
    assert float(score.from_outputs(_logits(g), g)) == pytest.approx(lse(*logits), rel=1e-6)
    msp = build_score(f"ash-{variant}+msp", prune_percentile=50).use_head(W, B)
    assert float(msp.from_outputs(_logits(g), g)) == pytest.approx(softmax(logits).max(), rel=1e-6)


def test_ash_keeps_exactly_k_and_breaks_ties_by_index():
    g = torch.tensor([[2.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    shaped, _ = ASH("b", 50).apply(g.double(), (W.double(), B.double()))
    # k = 2 of three tied 2s: units 0 and 1 win; s1 = 7 -> fill 3.5. All-zero input: stays zero (no 0 * inf).
    np.testing.assert_allclose(_np(shaped), [[3.5, 3.5, 0, 0], [0, 0, 0, 0]])
    zeros, _ = ASH("s", 50).apply(g[1:].double(), (W.double(), B.double()))
    assert torch.equal(zeros, torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ScoreError, match="keeps no activation"):
        ASH("p", 99.9).apply(g.double(), (W.double(), B.double()))
    with pytest.raises(ConfigError, match=r"prune_percentile must be in \[0, 100\)"):
        ASH("s", 100)


def test_dice_by_hand():
    w = torch.tensor([[1.0, -1.0, 2.0, 0.5], [0.0, 3.0, -1.0, 1.0]])
    b = torch.tensor([0.25, -0.5])
    train = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])  # mean m = [1, 2, 3, 4]
    # V = m * W = [[1, -2, 6, 2], [0, 6, -3, 4]]; sorted -3 -2 0 1 2 4 6 6; 75th percentile = 4 + 0.25 * 2 = 4.5;
    # V > 4.5 keeps W[0, 2] = 2 and W[1, 1] = 3.
    score = build_score("dice+energy", sparsity=75).use_head(w, b).fit(_logits(train, w, b), train, torch.zeros(2))
    expected_mask = torch.tensor([[False, False, True, False], [False, True, False, False]])
    assert torch.equal(score.shapers[0].mask.cpu(), expected_mask)
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 5.0, 9.0]])  # logits [2.25, 2.5] and [10.25, 5.5]
    got = score.from_outputs(_logits(g, w, b), g)
    np.testing.assert_allclose(_np(got), [lse(2.25, 2.5), lse(10.25, 5.5)], rtol=1e-6)


def test_dice_matches_official_route_formula():
    """RouteDICE: contrib = mean[None, :] * W; thresh = np.percentile(contrib, p); W * (contrib > thresh)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(5, 12)), rng.normal(size=5)
    train, test = np.abs(rng.normal(size=(40, 12))), np.abs(rng.normal(size=(9, 12)))
    contrib = train.mean(0)[None, :] * w
    masked = w * (contrib > np.percentile(contrib, 90))
    ref = logsumexp(test @ masked.T + b, axis=1)
    tw, tb = torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    tr, te = torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)
    score = build_score("dice").use_head(tw, tb).fit(_logits(tr, tw, tb), tr, torch.zeros(40))
    np.testing.assert_allclose(_np(score.from_outputs(_logits(te, tw, tb), te)), ref, rtol=1e-5)


def test_shaping_steps_compose_in_order():
    rng = torch.Generator().manual_seed(1)
    w, b = torch.randn(3, 8, generator=rng), torch.randn(3, generator=rng)
    train, test = torch.rand(50, 8, generator=rng) * 3, torch.rand(6, 8, generator=rng) * 4
    chain = build_score("react+dice+msp").use_head(w, b).fit(_logits(train, w, b), train, torch.zeros(50))
    c = float(np.percentile(_np(train), 90))
    clipped = np.minimum(_np(train), c)
    contrib = clipped.mean(0)[None, :] * _np(w)  # DICE is fitted on the ReAct-clipped features
    masked = _np(w) * (contrib > np.percentile(contrib, 90))
    ref = softmax(np.minimum(_np(test), c) @ masked.T + _np(b), axis=1).max(1)
    np.testing.assert_allclose(_np(chain.from_outputs(_logits(test, w, b), test)), ref, rtol=1e-5)
    assert chain.name == "react+dice+msp" and chain.needs_fit and chain.needs_head


def test_shaped_scores_refuse_what_they_cannot_do():
    with pytest.raises(ConfigError, match="logit score"):
        build_score("react+knn")
    with pytest.raises(ConfigError, match="appear once"):
        build_score("ash-s+ash-b+energy")
    with pytest.raises(ConfigError, match="unknown score"):
        build_score("clip+energy")
    with pytest.raises(ConfigError, match="no component takes 'k'"):
        build_score("react+energy", k=3)
    assert build_score("react").name == "react+energy"  # a bare shaping step: its paper's pairing
    g = torch.ones(2, 4)
    with pytest.raises(ScoreError, match=r"use_head"):
        build_score("ash-s").from_outputs(_logits(g), g)
    with pytest.raises(ScoreError, match=r"call \.fit"):
        build_score("react").use_head(W, B).from_outputs(_logits(g), g)


def test_shaped_hyperparameters_route_to_their_step():
    score = build_score("react+dice+energy", clip_percentile=95, sparsity=50, temperature=2.0)
    assert score.params() == {"clip_percentile": 95.0, "sparsity": 50.0, "temperature": 2.0}
    changed = score.with_params(sparsity=70)
    assert changed.params() == {"clip_percentile": 95.0, "sparsity": 70.0, "temperature": 2.0}
    assert score.hyperparameter_grid(8) == {"clip_percentile": [90.0, 80.0, 85.0, 95.0, 99.0],
                                            "sparsity": [90.0, 10.0, 30.0, 50.0, 70.0]}
    assert score.candidates(8)[0] == {"clip_percentile": 95.0, "sparsity": 50.0}  # the current setting first
    assert len(score.candidates(8)) == 25


# ----------------------------------------------------------------------------- GEN, KL matching


def test_gen_by_hand():
    f = torch.tensor([[2.0, 0.0, math.log(3.0)]])  # p = [e^2, 1, 3] / (e^2 + 4)
    z = math.exp(2) + 4
    p = sorted([math.exp(2) / z, 1 / z, 3 / z])
    g2 = sum(q ** 0.5 * (1 - q) ** 0.5 for q in p[-2:])  # top M = 2
    assert float(GEN(gamma=0.5, M=2).from_outputs(f, torch.zeros(1, 3))) == pytest.approx(-g2, rel=1e-6)
    g_all = sum(q ** 0.1 * (1 - q) ** 0.1 for q in p)  # defaults: gamma 0.1, M = 100 >= K -> every class
    assert float(build_score("gen").from_outputs(f, torch.zeros(1, 3))) == pytest.approx(-g_all, rel=1e-6)


def test_gen_confident_outputs_keep_resolution():
    f = torch.tensor([[30.0, 0.0, 0.0], [25.0, 0.0, 0.0]])  # 1 - p ~ 1e-13 and 1e-11: float32 would give 0 for both
    got = GEN().from_outputs(f, torch.zeros(2, 3))
    assert got[0] > got[1] and torch.isfinite(got).all()


def test_kl_matching_matches_official_formula():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(200, 4)) * 2, rng.normal(size=(30, 4)) * 2
    train[:, 3] -= 10  # class 3 never predicted on train: no template
    p_train, p_test = softmax(train, axis=1), softmax(test, axis=1)
    pred = p_train.argmax(1)
    templates = [p_train[pred == c].mean(0) for c in range(4) if (pred == c).any()]
    ref = -np.array([min(np.sum(p * np.log(p / d)) for d in templates) for p in p_test])
    score = KLMatching().fit(torch.tensor(train, dtype=torch.float32), torch.zeros(200, 2))
    got = score.from_outputs(torch.tensor(test, dtype=torch.float32), torch.zeros(30, 2))
    np.testing.assert_allclose(_np(got), ref, rtol=1e-4, atol=1e-6)
    assert len(templates) == 3 and score._log_templates.shape == (3, 4)


def test_kl_matching_by_hand():
    train = torch.tensor([[0.0, 0.0]])  # one input, p = [1/2, 1/2], predicted class 0 -> d_0 = [1/2, 1/2]
    score = KLMatching().fit(train, torch.zeros(1, 1))
    f = torch.tensor([[math.log(3.0), 0.0]])  # p = [3/4, 1/4]
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(score.from_outputs(f, torch.zeros(1, 1))) == pytest.approx(-kl, rel=1e-6)
    with pytest.raises(ScoreError, match="fitted on 2 classes"):
        score.from_outputs(torch.zeros(1, 3), torch.zeros(1, 1))


# ----------------------------------------------------------------------------- ViM, Residual


def _vim_case():
    """Head W = first two unit rows, b = [1, 2]: u = -W^+ b = [-1, -2, 0]; logits of u + c are c[:2]."""
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([1.0, 2.0])
    u = torch.tensor([-1.0, -2.0, 0.0])
    centred = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])  # 2nd moment diag(2, .5, 0)
    return w, b, u, u + centred


def test_residual_and_vim_by_hand():
    w, b, u, train = _vim_case()
    x = u + torch.tensor([[0.0, 3.0, 4.0]])  # principal subspace (dim 1) = axis 0 -> residual norm 5
    res = Residual(dim=1).use_head(w, b).fit(_logits(train, w, b), train)
    assert float(res.from_outputs(_logits(x, w, b), x)) == pytest.approx(-5.0)
    vim = ViM(dim=1).use_head(w, b).fit(_logits(train, w, b), train)
    # train max logits 2, 0, 1, 0 (mean 0.75); residual norms 0, 0, 1, 1 (mean 0.5) -> alpha = 1.5
    assert vim._alpha == pytest.approx(1.5)
    assert float(vim.from_outputs(_logits(x, w, b), x)) == pytest.approx(lse(0.0, 3.0) - 1.5 * 5.0, rel=1e-6)


def _vim_official(w, b, train, test, dim):
    """haoqiwang/vim benchmark.py, with numpy and scikit-learn."""
    u = -np.linalg.pinv(w) @ b
    ec = EmpiricalCovariance(assume_centered=True).fit(train - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    v_train = np.linalg.norm((train - u) @ ns, axis=-1)
    alpha = (train @ w.T + b).max(axis=-1).mean() / v_train.mean()
    v_test = np.linalg.norm((test - u) @ ns, axis=-1)
    return -v_test, logsumexp(test @ w.T + b, axis=-1) - alpha * v_test


@pytest.mark.parametrize("dim", [None, 3])
def test_vim_residual_match_official_code(dim):
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(10, 10))
    train, test = np.abs(rng.normal(size=(300, 10)) @ mix), np.abs(rng.normal(size=(20, 10)) @ mix) * 1.5
    w, b = rng.normal(size=(4, 10)), rng.normal(size=4)
    ref_res, ref_vim = _vim_official(w, b, train, test, 5 if dim is None else dim)  # default: D // 2
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in {"w": w, "b": b, "train": train, "test": test}.items()}
    for cls, ref in ((Residual, ref_res), (ViM, ref_vim)):
        score = cls(dim=dim).use_head(t["w"], t["b"]).fit(_logits(t["train"], t["w"], t["b"]), t["train"])
        got = score.from_outputs(_logits(t["test"], t["w"], t["b"]), t["test"])
        np.testing.assert_allclose(_np(got), ref, rtol=1e-4, atol=1e-4)


def test_subspace_dimension_checked():
    w, b, _, train = _vim_case()
    with pytest.raises(ScoreError, match=r"must be in \[1, 2\]"):
        Residual(dim=3).use_head(w, b).fit(_logits(train, w, b), train)
    with pytest.raises(ConfigError, match="dim must be >= 1"):
        ViM(dim=0)
    assert ViM().candidates(64) == [{"dim": 32}, {"dim": 8}, {"dim": 16}, {"dim": 48}]
    with pytest.raises(ScoreError, match="use_head"):
        ViM().fit(_logits(train, w, b), train)


# ----------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("name", [n for n in SCORE_NAMES if build_score(n).needs_head])
def test_head_scores_read_the_head_of_feature_model(name):
    torch.manual_seed(0)
    net = FeatureModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))).eval()
    weight, bias = net.head_parameters()
    assert torch.equal(weight, net.head.weight) and torch.equal(bias, net.head.bias)
    assert not weight.requires_grad
    x = torch.randn(40, 3, 2, 2)
    with torch.no_grad():
        lo, fe = net(x)
    torch.testing.assert_close(lo, fe @ weight.T + bias)
    score = build_score(name).use_head(weight, bias)
    if score.needs_fit:
        score.fit(lo, fe, lo.argmax(1))
    assert torch.isfinite(score.from_outputs(lo, fe)).all()
    with pytest.raises(ScoreError, match="dimension 5 but the (score was fitted on|head expects) "):
        score.from_outputs(lo, torch.zeros(40, 5))


def test_no_bias_head_gives_zero_bias():
    net = FeatureModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)))
    weight, bias = net.head_parameters()
    assert torch.equal(bias, torch.zeros(2))


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_every_score_is_higher_for_id_like_inputs(name):
    """ID-like inputs (large activations along a class direction) score above OOD-like ones (small, off-class)."""
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 4, 16
    weight = torch.zeros(num_classes, dim)
    for c in range(num_classes):
        weight[c, 4 * c: 4 * c + 4] = 1.0
    labels = torch.arange(200) % num_classes
    train = torch.rand(200, dim, generator=g) * 0.5
    for i, c in enumerate(labels.tolist()):
        train[i, 4 * c: 4 * c + 4] += 4.0
    ood = torch.rand(20, dim, generator=g) * 1.5
    idx = train[:20] + 0.1
    mild = {"knn": {"k": 5}, "dice+energy": {"sparsity": 50}, "ash-s+energy": {"prune_percentile": 50}}
    score: Score = build_score(name, **mild.get(name, {}))  # a toy: 16 units, 4 per class
    score.use_head(weight, torch.zeros(num_classes))
    if score.needs_fit:
        score.fit(_logits(train, weight, torch.zeros(num_classes)), train, labels)
    s_id = score.from_outputs(_logits(idx, weight, torch.zeros(num_classes)), idx)
    s_ood = score.from_outputs(_logits(ood, weight, torch.zeros(num_classes)), ood)
    assert s_id.min() > s_ood.max(), name


def test_with_params_is_a_fresh_copy_and_checks_values():
    score = Energy(temperature=2.0)
    assert score.with_params(temperature=5.0).temperature == 5.0 and score.temperature == 2.0
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        score.with_params(temperature=0.0)
    fitted = ReAct(95)
    fitted.fit(torch.ones(3, 2, dtype=torch.float64), (W.double(), B.double()))
    assert fitted.threshold == 1.0
    assert isinstance(MSP().with_params(), MSP)
    shaped = Shaped([DICE(50)], Energy()).use_head(W, B)
    assert shaped.with_params(sparsity=10)._weight is not None  # the head travels with the copy
