"""Long-tailed versions of balanced datasets (CIFAR-10-LT / CIFAR-100-LT).

Convention of Cao et al. (LDAM, NeurIPS 2019), used by PASCL (Wang et al., ICML 2022) and the Balanced
Energy code: with imbalance ratio ρ = n_max / n_min and K classes,

    n_i = floor(n_max · ρ^(-i/(K-1))),   i = 0..K-1

CIFAR-10-LT, ρ=100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images);
CIFAR-100-LT, ρ=100: 500 ... 5 (10,847 images). Head/medium/tail accuracy is in :mod:`oodtune.metrics.longtail`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError
from .imageset import ImageSet

__all__ = ["longtail_counts", "make_longtailed"]


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float = 100) -> list[int]:
    """n_i = floor(n_max · ρ^(-i/(K-1))) for i = 0..K-1 (see module docstring); ``[n_max]`` for K=1.

    Computed as ``int(n_max * (1/ρ) ** (i / (K - 1)))`` exactly like the LDAM/PASCL/Balanced Energy code, so
    floating-point rounding gives the same published counts.
    """
    if n_max < 1 or num_classes < 1:
        raise ConfigError(f"n_max and num_classes must be >= 1, got {n_max}, {num_classes}")
    if not imbalance_ratio >= 1:
        raise ConfigError(f"imbalance_ratio ρ = n_max/n_min must be >= 1 (e.g. 100), got {imbalance_ratio}; "
                         "codes that use 0.01 mean ρ = 100.")
    if num_classes == 1:
        return [int(n_max)]
    factor = 1.0 / imbalance_ratio
    return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def make_longtailed(ds: ImageSet, imbalance_ratio: float = 100, seed: int = 0, *,
                    order: Literal["dataset", "random"] = "dataset", n_max: int | None = None) -> ImageSet:
    """A long-tailed subset of the labelled ``ds``: class i keeps n_i images (:func:`longtail_counts`).

    Class 0 is the head, class K-1 the tail. ``n_max`` defaults to ``len(ds) // K`` (5000 for CIFAR-10, as in
    the reference code). Which images are kept:

    - ``order="dataset"`` (default): the first n_i images of each class in dataset order, exactly as PASCL /
      LDAM / the Balanced Energy code (``idx[:n]``, their ``np.random.shuffle`` is commented out). ``seed`` is
      not used then; the result is fully determined by ``ds``.
    - ``order="random"``: the first n_i of a permutation of each class seeded by ``seed``.

    The result is ordered class by class (class 0 first), like the reference, and named ``<name>-lt<ρ>``.
    Raises DataError if ``ds`` is unlabelled or a class has fewer than n_i images.
    """
    if ds.labels is None:
        raise DataError(f"{ds.name}: a long-tailed subset needs labels, but this set is unlabelled.")
    if order not in ("dataset", "random"):
        raise ConfigError(f"order must be 'dataset' or 'random', got {order!r}")
    k = ds.num_classes or int(ds.labels.max()) + 1
    targets = longtail_counts(n_max if n_max is not None else len(ds) // k, k, imbalance_ratio)
    rng = np.random.default_rng(seed)
    keep = []
    for c, n in enumerate(targets):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < n:
            raise DataError(f"{ds.name}: class {c} ({ds.classes[c] if ds.classes else c}) has {len(idx)} images but "
                            f"the long-tailed split (ρ={imbalance_ratio:g}) needs {n}; use a balanced source set or "
                            "pass a smaller n_max.")
        if order == "random":
            idx = rng.permutation(idx)
        keep.append(idx[:n])
    return ds.subset(np.concatenate(keep), name=f"{ds.name}-lt{imbalance_ratio:g}")
