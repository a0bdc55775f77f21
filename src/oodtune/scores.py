"""Post-hoc OOD scores of a trained classifier.

Convention (all of oodtune): **a score is "higher = more in-distribution"**. Scores that the papers define
as "higher = more anomalous" (energy, entropy, distances) are negated here, so every score can go straight
into ``oodtune.metrics`` without sign bookkeeping.

=============  ====================================================================================
name           score s(x) (f = logits, g = penultimate features, T = temperature)
=============  ====================================================================================
msp            max_c softmax(f)_c                                    (Hendrycks & Gimpel 2017)
maxlogit       max_c f_c                                             (Hendrycks et al. 2022)
entropy        -H(softmax(f)) = sum_c p_c log p_c
energy         -E(x; f) = T log sum_c exp(f_c / T)                   (Liu et al. 2020)
odin           max_c softmax(f(x') / T)_c,  x' = x - eps sign(-grad_x log max_c softmax(f(x)/T)_c)
               (Liang et al. 2018; T = 1000, eps = 0.0014)
mahalanobis    -min_c (g - mu_c)^T Sigma^+ (g - mu_c), class means mu_c and tied covariance Sigma
               fitted on ID train features                           (Lee et al. 2018)
knn            -|| z - z_(k) ||_2, z = g / ||g||, z_(k) = k-th nearest normalised ID-train feature
               (Sun et al. 2022; k = 50)
=============  ====================================================================================

Mahalanobis here is the *feature-only* variant: penultimate layer, no input pre-processing and no
ensemble over layers (Lee et al.'s full method adds both). It uses the *squared* distance as in the
paper's formula; the square root would give the same ranking and hence the same metrics.

Mahalanobis and kNN need ID statistics: call ``fit(logits, features, labels)`` on the outputs of the ID
*train* split first (``needs_fit``). ODIN needs input gradients (``needs_input_grad``): use
``score_inputs(net, x)``; its ``from_outputs`` is the temperature-scaled MSP without the perturbation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .energy import energy
from .errors import ConfigError, ScoreError
from .models.features import FeatureModel

# ----------------------------------------------------------------------------- validation helpers


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ScoreError(f"logits must have shape (batch, num_classes), got {tuple(logits.shape)}.")
    if not torch.isfinite(logits).all():
        raise ScoreError("logits contain NaN/inf; the model produced non-finite outputs "
                         "(diverged checkpoint or overflowing precision).")
    return logits.float()


def _check_features(features: torch.Tensor, batch: int | None = None, dim: int | None = None) -> torch.Tensor:
    if features.ndim != 2:
        raise ScoreError(f"features must have shape (batch, dim), got {tuple(features.shape)}; "
                         "flatten them (FeatureModel does) before scoring.")
    if batch is not None and features.shape[0] != batch:
        raise ScoreError(f"{features.shape[0]} feature rows but {batch} logit rows; pass the outputs of one batch.")
    if dim is not None and features.shape[1] != dim:
        raise ScoreError(f"features have dimension {features.shape[1]} but the score was fitted on dimension {dim}; "
                         "score with the same model (and layer) that produced the fit statistics.")
    if not torch.isfinite(features).all():
        raise ScoreError("features contain NaN/inf; the model produced non-finite outputs.")
    return features


def _f64_device(t: torch.Tensor) -> torch.device:
    """Where float64 math can run for ``t``: its own device, except MPS (no float64) -> CPU."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


# ----------------------------------------------------------------------------- base class


class Score(ABC):
    """A post-hoc OOD score: ``from_outputs(logits, features) -> (B,)``, higher = more in-distribution."""

    name: str
    needs_fit: bool = False  # needs ID training statistics (call fit first)
    needs_input_grad: bool = False  # needs the network and input gradients (use score_inputs)

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Score:
        """Fit ID statistics on the outputs of the ID *train* split. Default: nothing to fit."""
        return self

    @abstractmethod
    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from a batch of logits (B, K) and penultimate features (B, D)."""

    def score_inputs(self, net: FeatureModel, x: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of the (already normalised) inputs ``x``: one no-grad forward pass of ``net``."""
        with torch.no_grad():
            logits, features = net(x)
        return self.from_outputs(logits, features)

    def options(self) -> dict[str, Any]:
        """The settings this score was built with (public attributes; tensors as lists; fitted state, kept in
        ``_``-attributes, excluded) — what a cache of its values must be keyed by."""
        return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()
                if not k.startswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({params})"


class _LogitScore(Score):
    """Scores that only read the logits."""

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.from_logits(_check_logits(logits))

    @abstractmethod
    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from float32 logits (B, K)."""


# ----------------------------------------------------------------------------- logit scores


class MSP(_LogitScore):
    """Maximum softmax probability: s(x) = max_c softmax(f(x))_c (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1).amax(dim=1)


class MaxLogit(_LogitScore):
    """Maximum logit: s(x) = max_c f_c(x) (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.amax(dim=1)


class Entropy(_LogitScore):
    """Negative predictive entropy: s(x) = -H(p) = sum_c p_c log p_c, p = softmax(f(x)); in [-log K, 0]."""

    name = "entropy"

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


class Energy(_LogitScore):
    """Negative free energy: s(x) = -E(x; f) = T log sum_c exp(f_c(x) / T) (Liu et al., 2020)."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -energy(logits, self.temperature)


class ODIN(Score):
    """ODIN (Liang et al., 2018): temperature scaling plus a small input perturbation.

    x' = x - eps * sign(-grad_x log S_max(x; T)) / std,   s(x) = S_max(x'; T) = max_c softmax(f(x') / T)_c.

    The step increases the max softmax, more so for ID inputs. ``x`` is the *normalised* input; as in the
    ODIN / energy_ood code the step is taken in [0, 1] pixel units, i.e. divided by the per-channel
    normalisation ``std`` when given (``std=None``: a step of ``eps`` in normalised units). ``sign(0) = 0``.
    The network should be in eval mode (batch statistics would couple the samples of a batch); its
    parameters' ``.grad`` are left untouched (gradients are taken w.r.t. the input only).
    """

    name = "odin"
    needs_input_grad = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 std: Sequence[float] | torch.Tensor | None = None) -> None:
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.std is not None and (self.std.numel() == 0 or (self.std <= 0).any()):
            raise ConfigError(f"std must be positive per-channel values, got {self.std.tolist()}")

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled MSP of unperturbed outputs (ODIN with eps = 0)."""
        return (_check_logits(logits) / self.temperature).softmax(dim=1).amax(dim=1)

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
            log_smax = (_check_logits(logits) / self.temperature).log_softmax(dim=1).amax(dim=1)
            (grad,) = torch.autograd.grad(log_smax.sum(), x)  # per-sample: rows are independent in eval mode
        x_perturbed = (x + self._step(x, grad)).detach()  # = x - eps * sign(-grad log S_max)
        with torch.no_grad():
            logits, features = net(x_perturbed)
        return self.from_outputs(logits, features)


# ----------------------------------------------------------------------------- feature scores


class _FittedScore(Score):
    needs_fit = True
    _dim: int | None = None

    def _require_fit(self) -> int:
        if self._dim is None:
            raise ScoreError(f"{self.name} needs ID training statistics: call .fit(logits, features, labels) on the "
                             "outputs of the ID train split before scoring.")
        return self._dim


class Mahalanobis(_FittedScore):
    """Feature-space Mahalanobis score (Lee et al., 2018), penultimate layer, no input pre-processing.

    Fit: mu_c = mean of class-c train features; tied covariance Sigma = (1/N) sum_i (g_i - mu_{y_i})(...)^T
    (the maximum-likelihood estimate, as ``sklearn.covariance.EmpiricalCovariance`` on class-centred features).
    Score: s(x) = -min_c (g(x) - mu_c)^T Sigma^+ (g(x) - mu_c).

    Sigma^+ is the pseudo-inverse from a float64 eigendecomposition (eigenvalues below D * eps * max
    eigenvalue are treated as zero, like ``scipy.linalg.pinvh``); distances are computed in the whitened
    space W = V diag(lambda^-1/2), so Sigma^+ = W W^T is never formed and the quadratic form stays >= 0.
    """

    name = "mahalanobis"

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = int(batch_size)
        self._white: torch.Tensor | None = None  # (D, r) whitening matrix
        self._means_w: torch.Tensor | None = None  # (C, r) whitened class means

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Mahalanobis:
        feats = _check_features(features).to(_f64_device(features), torch.float64)
        labels = labels.to(feats.device).long().flatten()
        if labels.numel() != feats.shape[0]:
            raise ScoreError(f"{labels.numel()} labels but {feats.shape[0]} feature rows; pass one label per sample.")
        num_classes = max(int(labels.max()) + 1, logits.shape[1] if logits.ndim == 2 else 0)
        counts = torch.bincount(labels, minlength=num_classes).to(feats.dtype)
        present = counts > 0
        sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
        means = sums.index_add_(0, labels, feats)[present] / counts[present, None]
        class_index = torch.cumsum(present.long(), 0) - 1  # label -> row of ``means``
        centred = feats - means[class_index[labels]]
        cov = centred.T @ centred / feats.shape[0]
        eigval, eigvec = torch.linalg.eigh(cov)
        keep = eigval > eigval.max().clamp_min(0) * feats.shape[1] * torch.finfo(torch.float64).eps
        self._white = eigvec[:, keep] / eigval[keep].sqrt()
        self._means_w = means @ self._white
        self._dim = feats.shape[1]
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        dim = self._require_fit()
        feats = _check_features(features, _check_logits(logits).shape[0], dim)
        dev = _f64_device(feats)
        if self._white is None or self._means_w is None:
            raise ScoreError(f"{self.name} has no fitted statistics; call .fit() first.")
        white, means_w = self._white.to(dev), self._means_w.to(dev)
        out = []
        for chunk in feats.split(self.batch_size):
            z = chunk.to(dev, torch.float64) @ white
            d2 = torch.cdist(z, means_w, compute_mode="donot_use_mm_for_euclid_dist").square()
            out.append(-d2.amin(dim=1))
        return torch.cat(out).to(features.device, torch.float32)


class KNN(_FittedScore):
    """Deep nearest neighbours (Sun et al., 2022): s(x) = -|| z(x) - z_(k)(x) ||_2.

    z = g / ||g||_2 are L2-normalised penultimate features; z_(k)(x) is the k-th nearest normalised ID-train
    feature. For unit vectors ||a - b||^2 = 2 - 2 a.b, so the k-th neighbour is found with a batched
    matmul + top-k on the features' device; each block of queries uses at most ``max_block_bytes``.
    """

    name = "knn"

    def __init__(self, k: int = 50, max_block_bytes: int = 256 * 2**20) -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.max_block_bytes = int(max_block_bytes)
        self._bank: torch.Tensor | None = None  # (N, D) normalised ID train features

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> KNN:
        feats = _check_features(features)
        if feats.shape[0] < self.k:
            raise ScoreError(f"kNN with k={self.k} needs at least {self.k} ID train features, got {feats.shape[0]}; "
                             "use a smaller k or more training data.")
        self._bank = F.normalize(feats.float(), dim=1)
        self._dim = feats.shape[1]
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        dim = self._require_fit()
        queries = F.normalize(_check_features(features, _check_logits(logits).shape[0], dim).float(), dim=1)
        if self._bank is None:
            raise ScoreError(f"{self.name} has no fitted statistics; call .fit() first.")
        bank = self._bank.to(queries.device)
        rows = max(1, self.max_block_bytes // (4 * bank.shape[0]))
        out = []
        for block in queries.split(rows):
            kth_sim = (block @ bank.T).topk(self.k, dim=1).values[:, -1]
            out.append(-(2.0 - 2.0 * kth_sim).clamp_min(0).sqrt())
        return torch.cat(out)


# ----------------------------------------------------------------------------- pixel scores

#: Scores that read only the logits, and so apply to every pixel of a segmentation map.
PIXEL_SCORE_NAMES: tuple[str, ...] = ("msp", "maxlogit", "entropy", "energy")


def score_map(score: Score, logits: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Per-pixel scores (B, H, W), higher = more in-distribution, of segmentation logits (B, C, H, W): the score's
    formula applied to each pixel's class logits ``logits[:, :num_classes]`` (channels after them, such as a void
    or abstention output, are left out; default: all channels)."""
    if not isinstance(score, _LogitScore):
        raise ConfigError(f"score {score.name!r} is not a pixel score; segmentation supports "
                          f"{', '.join(PIXEL_SCORE_NAMES)}.")
    if logits.ndim != 4:
        raise ScoreError(f"segmentation logits must have shape (batch, channels, height, width), got "
                         f"{tuple(logits.shape)}.")
    b, _, h, w = logits.shape
    k = logits.shape[1] if num_classes is None else num_classes
    flat = logits[:, :k].permute(0, 2, 3, 1).reshape(-1, k)
    return score.from_outputs(flat, flat).reshape(b, h, w)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Score]] = {cls.name: cls for cls in (MSP, MaxLogit, Entropy, Energy, ODIN, Mahalanobis, KNN)}
SCORE_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_score(name: str, **kwargs: Any) -> Score:
    """A fresh score by name (one of ``SCORE_NAMES``); ``kwargs`` go to its constructor (e.g. ``temperature``)."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown score {name!r}; choose one of {', '.join(SCORE_NAMES)}.")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad options for score {key!r}: {err}") from None
