"""Scores on the penultimate features: Mahalanobis, kNN, ViM and Residual (all fitted on ID train features)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ScoreError
from .base import FittedScore, check_features, check_logits, f64_device

__all__ = ["KNN", "Mahalanobis", "Residual", "ViM"]


class Mahalanobis(FittedScore):
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
        feats = check_features(features).to(f64_device(features), torch.float64)
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
        feats = check_features(features, check_logits(logits).shape[0], dim)
        dev = f64_device(feats)
        if self._white is None or self._means_w is None:
            raise ScoreError(f"{self.name} has no fitted statistics; call .fit() first.")
        white, means_w = self._white.to(dev), self._means_w.to(dev)
        out = []
        for chunk in feats.split(self.batch_size):
            z = chunk.to(dev, torch.float64) @ white
            d2 = torch.cdist(z, means_w, compute_mode="donot_use_mm_for_euclid_dist").square()
            out.append(-d2.amin(dim=1))
        return torch.cat(out).to(features.device, torch.float32)


class KNN(FittedScore):
    """Deep nearest neighbours (Sun et al., 2022): s(x) = -|| z(x) - z_(k)(x) ||_2.

    z = g / ||g||_2 are L2-normalised penultimate features; z_(k)(x) is the k-th nearest normalised ID-train
    feature. For unit vectors ||a - b||^2 = 2 - 2 a.b, so the k-th neighbour is found with a batched
    matmul + top-k on the features' device; each block of queries uses at most ``max_block_bytes``. Default
    k = 50 (the paper's CIFAR-10 setting).
    """

    name = "knn"
    grid = {"k": (50, 1, 5, 10, 20, 100, 200)}

    def __init__(self, k: int = 50, max_block_bytes: int = 256 * 2**20) -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.max_block_bytes = int(max_block_bytes)
        self._bank: torch.Tensor | None = None  # (N, D) normalised ID train features

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> KNN:
        feats = check_features(features)
        if feats.shape[0] < self.k:
            raise ScoreError(f"kNN with k={self.k} needs at least {self.k} ID train features, got {feats.shape[0]}; "
                             "use a smaller k or more training data.")
        self._bank = F.normalize(feats.float(), dim=1)
        self._dim = feats.shape[1]
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        dim = self._require_fit()
        queries = F.normalize(check_features(features, check_logits(logits).shape[0], dim).float(), dim=1)
        if self._bank is None:
            raise ScoreError(f"{self.name} has no fitted statistics; call .fit() first.")
        bank = self._bank.to(queries.device)
        rows = max(1, self.max_block_bytes // (4 * bank.shape[0]))
        out = []
        for block in queries.split(rows):
            kth_sim = (block @ bank.T).topk(self.k, dim=1).values[:, -1]
            out.append(-(2.0 - 2.0 * kth_sim).clamp_min(0).sqrt())
        return torch.cat(out)



def _subspace_dim(dim: int | None, feature_dim: int) -> int:
    """The principal-subspace dimension for ``feature_dim`` features (None -> feature_dim // 2)."""
    resolved = max(1, feature_dim // 2) if dim is None else dim
    if not 1 <= resolved < feature_dim:
        raise ScoreError(f"the principal subspace dimension must be in [1, {feature_dim - 1}] for {feature_dim}-dim "
                         f"features, got {resolved}; pass dim=None (half the features) or a smaller dim.")
    return resolved


class _PrincipalResidual(FittedScore):
    """The part of a feature outside the principal subspace of the ID train features (Wang et al., 2022).

    Origin u = -pinv(W) b (the point the head maps to zero logits), so the subspace is that of the logit space's
    affine structure; the principal subspace P spans the ``dim`` leading eigenvectors of the *uncentred* second
    moment (1/N) sum_i (g_i - u)(g_i - u)^T of the ID train features (``EmpiricalCovariance(assume_centered=True)``
    in the official code); r(x) = ||(g(x) - u) projected on P^perp||_2. ``dim=None`` is D // 2, the ratio of
    OpenOOD's CIFAR setting (256 of 512); the official code's rule (1000 for D >= 2048, else 512) presumes D > 512.
    """

    needs_head = True

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and int(dim) < 1:
            raise ConfigError(f"dim must be >= 1 (or None for half the feature dimension), got {dim}")
        self.dim = None if dim is None else int(dim)
        self._origin: torch.Tensor | None = None  # (D,) u, float64
        self._residual_basis: torch.Tensor | None = None  # (D, D - dim) float64

    def hyperparameters(self, feature_dim: int) -> dict[str, Any]:
        return {"dim": _subspace_dim(self.dim, feature_dim)}

    def hyperparameter_grid(self, feature_dim: int) -> dict[str, list[Any]]:
        dims = {max(1, round(feature_dim * f)) for f in (0.5, 0.125, 0.25, 0.75)}
        return {"dim": sorted(d for d in dims if d < feature_dim)}

    def _fit_subspace(self, features: torch.Tensor) -> torch.Tensor:
        """Fit u and P^perp on ID train features; returns their residual norms (N,) in float64."""
        weight, bias = self._head(features)
        feats = check_features(features).to(weight.device, torch.float64)
        dim = _subspace_dim(self.dim, feats.shape[1])
        self._origin = -torch.linalg.pinv(weight) @ bias
        centred = feats - self._origin
        _, eigvec = torch.linalg.eigh(centred.T @ centred / feats.shape[0])  # ascending eigenvalues
        self._residual_basis = eigvec[:, : feats.shape[1] - dim]
        self._dim = feats.shape[1]
        return (centred @ self._residual_basis).norm(dim=1)

    def _residual_norm(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        dim = self._require_fit()
        feats = check_features(features, check_logits(logits).shape[0], dim)
        if self._origin is None or self._residual_basis is None:
            raise ScoreError(f"{self.name} has no fitted statistics; call .fit() first.")
        dev = f64_device(feats)
        return ((feats.to(dev, torch.float64) - self._origin.to(dev)) @ self._residual_basis.to(dev)).norm(dim=1)


class Residual(_PrincipalResidual):
    """Residual (Wang et al., "ViM: Out-of-distribution with virtual-logit matching", CVPR 2022, its baseline):

    s(x) = -||(g(x) - u) projected on P^perp||_2   (see :class:`_PrincipalResidual` for u and P).
    """

    name = "residual"

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> Residual:
        self._fit_subspace(features)
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return (-self._residual_norm(logits, features)).to(features.device, torch.float32)


class ViM(_PrincipalResidual):
    """Virtual-logit matching (Wang et al., CVPR 2022):

    s(x) = log sum_c exp f_c(x) - alpha * r(x),   alpha = mean_train max_c f_c / mean_train r,

    r(x) the residual norm of :class:`_PrincipalResidual` and both means over the ID train split. The paper
    scores OOD-ness by the softmax probability of the virtual logit alpha * r(x) among [f, alpha * r]; that is a
    monotone function of alpha * r(x) - log sum exp f(x), so this "higher = ID" form (the official code's
    ``-vlogit + energy``) ranks identically.
    """

    name = "vim"

    def __init__(self, dim: int | None = None) -> None:
        super().__init__(dim)
        self._alpha: float | None = None

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> ViM:
        residual = self._fit_subspace(features)
        max_logit = check_logits(logits).to(residual.device, torch.float64).amax(dim=1)
        if not residual.mean() > 0:
            raise ScoreError("ViM: the ID train features lie entirely inside the principal subspace (zero residual); "
                             "use a smaller dim.")
        self._alpha = float(max_logit.mean() / residual.mean())
        return self

    def from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        residual = self._residual_norm(logits, features)
        if self._alpha is None:
            raise ScoreError("vim has no fitted statistics; call .fit() first.")
        lse = torch.logsumexp(logits.to(residual.device, torch.float64), dim=1)
        return (lse - self._alpha * residual).to(features.device, torch.float32)
