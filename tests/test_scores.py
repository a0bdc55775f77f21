"""oodtune.scores against independent computations (numpy/scipy/scikit-learn) and the ID-higher convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax
from scipy.stats import entropy as scipy_entropy
from sklearn.neighbors import NearestNeighbors
from torch import nn

from oodtune.models.features import FeatureModel
from oodtune.scores import KNN, ODIN, SCORE_NAMES, Mahalanobis, Score, ScoreError, build_score


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(64, 10) * 4


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _dummy_feats(n: int, d: int = 3) -> torch.Tensor:
    return torch.zeros(n, d)


def _clustered(n: int, num_classes: int = 4, dim: int = 6, seed: int = 0):
    """Class-clustered features with a non-diagonal shared covariance, their labels and dummy logits."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    feats = centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix
    return feats.float(), labels, torch.zeros(n, num_classes)


# ----------------------------------------------------------------------------- logit scores


def test_msp_maxlogit_entropy_energy_match_numpy(logits):
    f = _np(logits)
    p = softmax(f, axis=1)
    expected = {"msp": p.max(1), "maxlogit": f.max(1), "entropy": -scipy_entropy(p, axis=1),
                "energy": logsumexp(f, axis=1)}
    for name, ref in expected.items():
        got = build_score(name).from_outputs(logits, _dummy_feats(len(f)))
        assert got.shape == (len(f),)
        np.testing.assert_allclose(_np(got), ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 1000.0])
def test_energy_temperature(logits, temperature):
    got = build_score("energy", temperature=temperature).from_outputs(logits, _dummy_feats(len(logits)))
    ref = temperature * logsumexp(_np(logits) / temperature, axis=1)  # -E = T log sum exp(f / T)
    np.testing.assert_allclose(_np(got), ref, rtol=1e-5)


def test_odin_from_outputs_is_temperature_scaled_msp(logits):
    got = build_score("odin", temperature=10.0).from_outputs(logits, _dummy_feats(len(logits)))
    np.testing.assert_allclose(_np(got), softmax(_np(logits) / 10.0, axis=1).max(1), rtol=1e-5)


CONFIDENT, FLAT = torch.tensor([[12.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.9, 1.1, 1.0]])


@pytest.mark.parametrize("name", ["msp", "maxlogit", "entropy", "energy", "odin"])
def test_confident_logits_score_higher(name):
    score = build_score(name)
    assert score.from_outputs(CONFIDENT, _dummy_feats(1)) > score.from_outputs(FLAT, _dummy_feats(1))


# ----------------------------------------------------------------------------- ODIN with a network


def _linear_net(in_features: int = 12, classes: int = 5, seed: int = 0) -> FeatureModel:
    torch.manual_seed(seed)
    return FeatureModel(nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes))).eval()


def _odin_by_hand(net: FeatureModel, x: torch.Tensor, temperature: float, eps: float, std=None) -> np.ndarray:
    """Closed form for a linear net f(x) = Wx + b: grad_x log S_max = (W_c - sum_j p_j W_j) / T."""
    lin = net.head
    w, b = _np(lin.weight), _np(lin.bias)
    xs = _np(x).reshape(len(x), -1)
    f = xs @ w.T + b
    p = softmax(f / temperature, axis=1)
    c = f.argmax(1)
    grad = (w[c] - p @ w) / temperature
    step = eps * np.sign(grad)
    if std is not None:
        per_channel = np.asarray(std)[None, :, None, None] * np.ones(x.shape)
        step = step / per_channel.reshape(len(x), -1)
    return softmax(((xs + step) @ w.T + b) / temperature, axis=1).max(1)


@pytest.mark.parametrize(("temperature", "eps"), [(1000.0, 0.0014), (1.0, 0.05)])
def test_odin_matches_closed_form_on_linear_net(temperature, eps):
    net, x = _linear_net(), torch.randn(16, 3, 2, 2)
    got = ODIN(temperature, eps).score_inputs(net, x)
    np.testing.assert_allclose(_np(got), _odin_by_hand(net, x, temperature, eps), rtol=1e-5, atol=1e-7)


def test_odin_step_is_divided_by_std():
    net, x, std = _linear_net(), torch.randn(8, 3, 2, 2), (0.25, 0.5, 0.125)
    got = ODIN(1.0, 0.05, std=std).score_inputs(net, x)
    np.testing.assert_allclose(_np(got), _odin_by_hand(net, x, 1.0, 0.05, std), rtol=1e-5, atol=1e-7)
    with pytest.raises(ScoreError, match="std has 3 channels"):
        ODIN(std=std).score_inputs(_linear_net(4), torch.randn(2, 4))


def test_odin_perturbation_increases_max_softmax_and_leaves_net_alone():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 4))
    net = FeatureModel(model).eval()
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(32, 3, 2, 2)
    odin = ODIN(temperature=1.0, epsilon=0.01)
    with torch.no_grad():  # the caller's no_grad must not break the input gradient
        perturbed = odin.score_inputs(net, x)
    unperturbed = odin.from_outputs(*net(x))
    assert (perturbed > unperturbed).all()
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not net.training
    assert torch.equal(odin.score_inputs(net, x), perturbed)  # eval mode: deterministic


def test_odin_needs_input_grad_flags():
    assert build_score("odin").needs_input_grad and not build_score("odin").needs_fit
    assert not any(build_score(n).needs_input_grad for n in SCORE_NAMES if n != "odin")


# ----------------------------------------------------------------------------- Mahalanobis


def test_mahalanobis_matches_scipy():
    feats, labels, lo = _clustered(600)
    test_feats, _, test_lo = _clustered(50, seed=1)
    score = build_score("mahalanobis").fit(lo, feats, labels)
    f, y = _np(feats), labels.numpy()
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    centred = f - means[y]
    precision = np.linalg.inv(centred.T @ centred / len(f))  # tied MLE covariance, as EmpiricalCovariance
    ref = [-min(mahalanobis(g, mu, precision) ** 2 for mu in means) for g in _np(test_feats)]
    np.testing.assert_allclose(_np(score.from_outputs(test_lo, test_feats)), ref, rtol=1e-5)


def test_mahalanobis_singular_covariance_uses_pseudo_inverse():
    feats, labels, lo = _clustered(300, dim=5)
    feats = torch.cat([feats, torch.zeros(300, 2), feats[:, :1] * 2], dim=1)  # rank 5 of 8
    score = Mahalanobis(batch_size=7).fit(lo, feats, labels)
    queries = feats[:20] + 0.1
    f, y = _np(feats), labels.numpy()
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    centred = f - means[y]
    pinv = np.linalg.pinv(centred.T @ centred / len(f), hermitian=True, rcond=1e-10)
    diff = _np(queries)[:, None, :] - means[None]
    ref = -np.einsum("ncd,de,nce->nc", diff, pinv, diff).min(1)
    got = _np(score.from_outputs(lo[:20], queries))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_mahalanobis_convention_near_mean_scores_higher():
    feats, labels, lo = _clustered(400)
    score = build_score("mahalanobis").fit(lo, feats, labels)
    near = feats[labels == 0].mean(0, keepdim=True)
    far = near + 100.0
    assert score.from_outputs(lo[:1], near) > score.from_outputs(lo[:1], far)


# ----------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_matches_sklearn(k):
    feats, _, lo = _clustered(500, dim=8)
    queries, _, qlo = _clustered(70, dim=8, seed=3)
    score = KNN(k=k, max_block_bytes=4 * 500 * 16).fit(lo, feats)  # 16 query rows per block: exercises batching
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    nn_index = NearestNeighbors(n_neighbors=k).fit(unit(_np(feats)))
    ref = -nn_index.kneighbors(unit(_np(queries)))[0][:, k - 1]
    np.testing.assert_allclose(_np(score.from_outputs(qlo, queries)), ref, rtol=1e-4, atol=1e-4)


def test_knn_convention_and_scale_invariance():
    feats, labels, lo = _clustered(300, dim=8)
    score = build_score("knn", k=10).fit(lo, feats, labels)
    near, far = feats[:1] * 3.0, -feats[:1]  # same direction as a train point vs the opposite direction
    assert score.from_outputs(lo[:1], near) > score.from_outputs(lo[:1], far)
    torch.testing.assert_close(score.from_outputs(lo[:5], feats[:5]), score.from_outputs(lo[:5], 10 * feats[:5]))


def test_knn_needs_enough_train_points():
    with pytest.raises(ScoreError, match="k=50 needs at least 50"):
        KNN().fit(torch.zeros(10, 3), torch.randn(10, 4))


# ----------------------------------------------------------------------------- fitting and validation


@pytest.mark.parametrize("name", ["mahalanobis", "knn"])
def test_fitted_scores_require_fit_and_matching_dims(name):
    score = build_score(name)
    assert score.needs_fit
    with pytest.raises(ScoreError, match=r"call \.fit\(logits, features, labels\)"):
        score.from_outputs(torch.zeros(2, 4), torch.zeros(2, 6))
    feats, labels, lo = _clustered(100)
    score.fit(lo, feats, labels)
    with pytest.raises(ScoreError, match="dimension 5 but the score was fitted on dimension 6"):
        score.from_outputs(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ScoreError, match="3 feature rows but 2 logit rows"):
        score.from_outputs(torch.zeros(2, 4), torch.zeros(3, 6))
    with pytest.raises(ScoreError, match="NaN"):
        score.from_outputs(torch.zeros(1, 4), torch.full((1, 6), float("nan")))


def _ready(score: Score, num_classes: int = 4, n: int = 60, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``score`` a random head and fit it on clustered data when it needs either; returns (feats, labels)."""
    feats, labels, _ = _clustered(n, num_classes, dim)
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(num_classes, dim, generator=g), torch.randn(num_classes, generator=g)
    if score.needs_head:
        score.use_head(weight, bias)
    if score.needs_fit:
        score.fit(feats @ weight.T + bias, feats, labels)
    return feats, labels


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_nan_logits_raise(name):
    score = build_score(name, **({"k": 5} if name == "knn" else {}))
    feats, _ = _ready(score)
    bad = torch.tensor([[0.0, float("nan"), 1.0, 0.0]])
    with pytest.raises(ScoreError, match="NaN"):
        score.from_outputs(bad, feats[:1])  # a broken model shows in its logits even if features look fine


def test_bad_logit_shape_raises():
    with pytest.raises(ScoreError, match=r"\(batch, num_classes\)"):
        build_score("msp").from_outputs(torch.zeros(5), _dummy_feats(5))


# ----------------------------------------------------------------------------- registry and FeatureModel


def test_build_score_registry():
    assert SCORE_NAMES == ("msp", "maxlogit", "entropy", "energy", "gen", "klm", "odin", "mahalanobis", "knn", "vim",
                           "residual", "react+energy", "ash-s+energy", "ash-b+energy", "ash-p+energy", "dice+energy")
    for name in SCORE_NAMES:
        score = build_score(name)
        assert isinstance(score, Score) and score.name == name
    assert build_score("Energy", temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError, match="unknown score 'gradnorm'"):
        build_score("gradnorm")
    with pytest.raises(ValueError, match="bad options for score 'msp'"):
        build_score("msp", temperature=2.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_score("energy", temperature=0)


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_scores_work_with_plain_user_sequential(name):
    torch.manual_seed(0)
    user_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                               nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net = FeatureModel(user_model).eval()
    score = build_score(name, **({"k": 5} if name == "knn" else {}))
    if score.needs_head:
        score.use_head(*net.head_parameters())
    if score.needs_fit:
        with torch.no_grad():
            lo, fe = net(torch.randn(40, 3, 8, 8))
        score.fit(lo, fe, torch.randint(0, 3, (40,)))
    x = torch.randn(6, 3, 8, 8)
    got = score.score_inputs(net, x)
    assert got.shape == (6,) and got.dtype == torch.float32 and torch.isfinite(got).all()
    if not score.needs_input_grad:
        with torch.no_grad():
            torch.testing.assert_close(got, score.from_outputs(*net(x)))
