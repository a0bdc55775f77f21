"""Accuracy on long-tailed training sets: head / medium / tail splits and post-hoc logit adjustment.

Splits are made from the per-class *training* counts (:func:`class_splits`); :func:`split_accuracy` is the
accuracy on the test samples of each split. Logit adjustment (Menon et al., ICLR 2021) removes the bias
towards head classes:

    f̃_y(x) = f_y(x) - τ · log π_y

where π is the training class prior; the Balanced Energy paper reports "Ours + AdjLogit" on CIFAR-LT this way
(τ = 1). :func:`long_tail_accuracy` reports both, as the benchmark tabulates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["SPLITS", "LT_KEYS", "adjust_logits", "class_splits", "split_accuracy", "long_tail_accuracy"]

SPLITS = ("head", "medium", "tail")
#: The keys of :func:`long_tail_accuracy` (in %), plain and logit-adjusted.
LT_KEYS = tuple(f"{tag}acc_{s}" for tag in ("", "la_") for s in ("all", *SPLITS))

def adjust_logits(logits: Tensor, class_prior: Tensor | Sequence[float], tau: float = 1.0) -> Tensor:
    """``logits - tau * log(prior)`` with ``prior`` L1-normalised (raw class counts are accepted).

    ``logits`` is (B, K) (or (K,)); the result is float32 (float64 stays float64). Every prior entry must be
    > 0 (a class with no training images has no defined adjustment).
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    prior = torch.as_tensor(class_prior, dtype=torch.float64)
    if prior.ndim != 1 or prior.numel() != x.shape[-1]:
        raise ConfigError(f"class_prior must have one entry per class ({x.shape[-1]}), got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all() or (prior <= 0).any():
        raise ConfigError(f"class_prior entries must be finite and > 0, got {prior.tolist()}")
    log_prior = (prior / prior.sum()).log().to(device=x.device, dtype=x.dtype)
    return x - tau * log_prior


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
        raise ConfigError(f"counts must be a non-empty 1-D sequence, got shape {c.shape}")
    if rule == "shots":
        head = np.flatnonzero(c > many_shot)
        tail = np.flatnonzero(c < few_shot)
    elif rule == "rank":
        if not (head_fraction >= 0 and tail_fraction >= 0 and head_fraction + tail_fraction <= 1):
            raise ConfigError(f"need 0 <= head_fraction, tail_fraction and their sum <= 1, "
                             f"got {head_fraction}, {tail_fraction}")
        ranked = np.argsort(-c, kind="stable")
        n_head, n_tail = round(head_fraction * len(c)), round(tail_fraction * len(c))
        n_tail = min(n_tail, len(c) - n_head)
        head, tail = ranked[:n_head], ranked[len(c) - n_tail:]
    else:
        raise ConfigError(f"rule must be 'rank' or 'shots', got {rule!r}")
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
        raise ConfigError(f"preds and labels differ in length: {len(p)} vs {len(y)}")
    correct = p == y

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    out = {name: acc(np.isin(y, list(classes))) for name, classes in splits.items()}
    out["all"] = acc(np.ones_like(correct, dtype=bool))
    return out


def long_tail_accuracy(logits: Tensor, labels: np.ndarray | Tensor, class_counts: Sequence[int]) -> dict[str, float]:
    """Head/medium/tail/all accuracy in %, plain (``acc_*``) and with logit adjustment τ = 1 (``la_acc_*``).

    Splits follow :func:`class_splits` on the *training* ``class_counts``; the adjustment subtracts
    log(train prior).
    """
    splits = class_splits(class_counts)
    adjusted = adjust_logits(logits, torch.tensor(list(class_counts), dtype=torch.float32))
    out: dict[str, float] = {}
    for tag, lo in {"": logits, "la_": adjusted}.items():
        out.update({f"{tag}acc_{k}": 100 * v for k, v in split_accuracy(lo.argmax(1), labels, splits).items()})
    return out
