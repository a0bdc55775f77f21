"""Scores computed from the logits alone: MSP, MaxLogit, Entropy, Energy, GEN, KL-Matching, and ODIN (which
perturbs its input and scores the perturbed logits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, ScoreError
from ..functional import energy
from ..models.features import FeatureModel
from .base import FittedScore, LogitScore, Score, check_logits, f64_device

__all__ = ["ODIN", "GEN", "MSP", "Energy", "Entropy", "KLMatching", "MaxLogit"]


class MSP(LogitScore):
    """Maximum softmax probability: s(x) = max_c softmax(f(x))_c (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1).amax(dim=1)


class MaxLogit(LogitScore):
    """Maximum logit: s(x) = max_c f_c(x) (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.amax(dim=1)


class Entropy(LogitScore):
    """Negative predictive entropy: s(x) = -H(p) = sum_c p_c log p_c, p = softmax(f(x)); in [-log K, 0]."""

    name = "entropy"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return float(value)


class Energy(LogitScore):
    """Negative free energy: s(x) = -E(x; f) = T log sum_c exp(f_c(x) / T) (Liu et al., 2020; T = 1)."""

    name = "energy"
    grid = {"temperature": (1.0, 0.5, 2.0, 5.0, 10.0)}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive("temperature", temperature)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -energy(logits, self.temperature)


class GEN(LogitScore):
    """Generalized entropy (Liu, Lochman & Zach, CVPR 2023):

    s(x) = -G_gamma(p) = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,   p = softmax(f(x)), gamma = 0.1, M = 100.

    The sum runs over the M largest probabilities (all K when M >= K, as for CIFAR-10), as in the official code
    (XixiLiu95/GEN ``benchmark.py``); 1 - p is computed as -expm1(log p) in float64 so that confident inputs keep
    their resolution.
    """

    name = "gen"
    grid = {"gamma": (0.1, 0.01, 0.03, 0.3, 1.0)}

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        self.gamma = _positive("gamma", gamma)
        if int(M) < 1:
            raise ConfigError(f"M must be >= 1, got {M}")
        self.M = int(M)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = logits.to(f64_device(logits), torch.float64).log_softmax(dim=1)
        top = log_p.topk(min(self.M, log_p.shape[1]), dim=1).values
        g = (self.gamma * top).exp() * (-torch.expm1(top)).clamp_min(0) ** self.gamma
        return (-g.sum(dim=1)).to(logits.device, torch.float32)


class KLMatching(FittedScore, LogitScore):
    """KL matching (Hendrycks et al., "Scaling out-of-distribution detection for real-world settings", ICML 2022):

    s(x) = -min_c KL(p(x) || d_c),   d_c = mean of p(x') over ID train inputs x' predicted as class c,

    p = softmax(f). As in the ViM authors' code (haoqiwang/vim ``benchmark.py``) the templates d_c come from the
    ID *train* split (the paper used a held-out ID set); classes that no training input is predicted as have no
    template and are skipped. KL(p || d) = sum_j p_j log(p_j / d_j) with 0 log 0 = 0.
    """

    name = "klm"

    def __init__(self) -> None:
        self._log_templates: torch.Tensor | None = None  # (C', K) log d_c, float64

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> KLMatching:
        log_p = check_logits(logits).to(f64_device(logits), torch.float64).log_softmax(dim=1)
        pred = log_p.argmax(dim=1)
        counts = torch.bincount(pred, minlength=log_p.shape[1])
        k = log_p.shape[1]
        sums = torch.zeros(k, k, dtype=log_p.dtype, device=log_p.device).index_add_(0, pred, log_p.exp())
        present = counts > 0
        templates = sums[present] / counts[present, None].to(sums.dtype)
        self._log_templates = templates.clamp_min(torch.finfo(torch.float64).tiny).log()
        self._dim = log_p.shape[1]
        return self

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        classes = self._require_fit()
        if logits.shape[1] != classes or self._log_templates is None:
            raise ScoreError(f"{logits.shape[1]} logits per input but KL matching was fitted on {classes} classes; "
                             "score with the model that produced the fit statistics.")
        log_p = logits.to(f64_device(logits), torch.float64).log_softmax(dim=1)
        p = log_p.exp()
        neg_entropy = torch.special.xlogy(p, p).sum(dim=1)
        cross = p @ self._log_templates.to(p.device).T  # (B, C') sum_j p_j log d_cj
        return -(neg_entropy[:, None] - cross).amin(dim=1).to(logits.device, torch.float32)


class ODIN(Score):
    """ODIN (Liang et al., 2018): temperature scaling plus a small input perturbation.

    x' = x - eps * sign(-grad_x log S_max(x; T)) / std,   s(x) = S_max(x'; T) = max_c softmax(f(x') / T)_c.

    The step increases the max softmax, more so for ID inputs. ``x`` is the *normalised* input; as in the
    ODIN / energy_ood code the step is taken in [0, 1] pixel units, i.e. divided by the per-channel
    normalisation ``std`` when given (``std=None``: a step of ``eps`` in normalised units). ``sign(0) = 0``.
    The network should be in eval mode (batch statistics would couple the samples of a batch); its
    parameters' ``.grad`` are left untouched (gradients are taken w.r.t. the input only). Defaults T = 1000,
    eps = 0.0014; the selection grid is a subset of the paper's (T up to 1000, eps in [0, 0.004]).
    """

    name = "odin"
    needs_input_grad = True
    grid = {"temperature": (1000.0, 1.0, 10.0, 100.0), "epsilon": (0.0014, 0.0, 0.0005, 0.001, 0.002, 0.004)}

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 std: Sequence[float] | torch.Tensor | None = None) -> None:
        self.temperature = _positive("temperature", temperature)
        if epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.std is not None and (self.std.numel() == 0 or (self.std <= 0).any()):
            raise ConfigError(f"std must be positive per-channel values, got {self.std.tolist()}")

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled MSP of unperturbed outputs (ODIN with eps = 0)."""
        return (check_logits(logits) / self.temperature).softmax(dim=1).amax(dim=1)

    def _step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        step = self.epsilon * torch.sign(grad)
        if self.std is not None:
            if x.ndim < 2 or x.shape[1] != self.std.numel():
                raise ScoreError(f"std has {self.std.numel()} channels but the input has shape {tuple(x.shape)}; "
                                 "pass one std per input channel (dim 1).")
            step = step / self.std.to(x.device).view(1, -1, *([1] * (x.ndim - 2)))
        return step

    def score_inputs(self, net: FeatureModel, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits, _ = net(x)
            log_smax = (check_logits(logits) / self.temperature).log_softmax(dim=1).amax(dim=1)
            (grad,) = torch.autograd.grad(log_smax.sum(), x)  # per-sample: rows are independent in eval mode
        x_perturbed = (x + self._step(x, grad)).detach()  # = x - eps * sign(-grad log S_max)
        with torch.no_grad():
            logits, features = net(x_perturbed)
        return self.from_outputs(logits, features)
