"""Long-tailed versions of balanced datasets (CIFAR-10-LT / CIFAR-100-LT) and head/medium/tail metrics.

Convention of Cao et al. (LDAM, NeurIPS 2019), used by PASCL (Wang et al., ICML 2022) and the Balanced
Energy code: with imbalance ratio ρ = n_max / n_min and K classes,

    n_i = floor(n_max · ρ^(-i/(K-1))),   i = 0..K-1

CIFAR-10-LT, ρ=100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images);
CIFAR-100-LT, ρ=100: 500 ... 5 (10,847 images).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .imageset import DataError, ImageSet

__all__ = ["longtail_counts", "make_longtailed", "class_splits", "split_accuracy", "SPLITS"]

SPLITS = ("head", "medium", "tail")


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float = 100) -> list[int]:
    """n_i = floor(n_max · ρ^(-i/(K-1))) for i = 0..K-1 (see module docstring); ``[n_max]`` for K=1.

    Computed as ``int(n_max * (1/ρ) ** (i / (K - 1)))`` exactly like the LDAM/PASCL/Balanced Energy code, so
    floating-point rounding gives the same published counts.
    """
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"n_max and num_classes must be >= 1, got {n_max}, {num_classes}")
    if not imbalance_ratio >= 1:
        raise ValueError(f"imbalance_ratio ρ = n_max/n_min must be >= 1 (e.g. 100), got {imbalance_ratio}; "
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
        raise ValueError(f"order must be 'dataset' or 'random', got {order!r}")
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


def class_splits(counts: Sequence[int] | np.ndarray, *, rule: Literal["rank", "shots"] = "rank",
                 head_fraction: float = 0.3, tail_fraction: float = 0.3, many_shot: int = 100,
                 few_shot: int = 20) -> dict[str, list[int]]:
    """Head / medium / tail class indices from the per-class *training* counts.

    - ``rule="rank"`` (default): sort classes by count (descending, ties by index); the first
      round(head_fraction·K) are head, the last round(tail_fraction·K) tail, the rest medium. For CIFAR-10-LT
      this is PASCL's split (head = classes 0-2, medium = 3-6, tail = 7-9); for CIFAR-100-LT 30/40/30.
    - ``rule="shots"``: the many/medium/few-shot split of Liu et al. (OLTR, CVPR 2019) used for
      CIFAR-100-LT / ImageNet-LT: head = count > many_shot (100), tail = count < few_shot (20), medium =
      the rest. (For CIFAR-100-LT ρ=100: 35 / 35 / 30 classes.) Unsuitable for CIFAR-10-LT (no class < 20).

    Every split is a sorted list (possibly empty) of class indices.
    """
    c = np.asarray(counts)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {c.shape}")
    if rule == "shots":
        head = np.flatnonzero(c > many_shot)
        tail = np.flatnonzero(c < few_shot)
    elif rule == "rank":
        if not (0 <= head_fraction and 0 <= tail_fraction and head_fraction + tail_fraction <= 1):
            raise ValueError(f"need 0 <= head_fraction, tail_fraction and their sum <= 1, "
                             f"got {head_fraction}, {tail_fraction}")
        ranked = np.argsort(-c, kind="stable")
        n_head, n_tail = round(head_fraction * len(c)), round(tail_fraction * len(c))
        n_tail = min(n_tail, len(c) - n_head)
        head, tail = ranked[:n_head], ranked[len(c) - n_tail:]
    else:
        raise ValueError(f"rule must be 'rank' or 'shots', got {rule!r}")
    taken = set(head.tolist()) | set(tail.tolist())
    medium = [i for i in range(len(c)) if i not in taken]
    return {"head": sorted(head.tolist()), "medium": medium, "tail": sorted(tail.tolist())}


def _as_numpy(a: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def split_accuracy(preds: np.ndarray | torch.Tensor | Sequence[int], labels: np.ndarray | torch.Tensor | Sequence[int],
                   splits: dict[str, list[int]]) -> dict[str, float]:
    """Accuracy on the test samples whose label is in each split, plus ``"all"``.

    Sample-weighted within a split (on a class-balanced test set this equals the mean per-class accuracy).
    A split with no test samples gets NaN.
    """
    p, y = _as_numpy(preds).reshape(-1), _as_numpy(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {len(p)} vs {len(y)}")
    correct = p == y

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    out = {name: acc(np.isin(y, list(classes))) for name, classes in splits.items()}
    out["all"] = acc(np.ones_like(correct, dtype=bool))
    return out
