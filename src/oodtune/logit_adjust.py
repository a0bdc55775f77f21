"""Post-hoc logit adjustment for long-tailed training sets (Menon et al., ICLR 2021).

    f̃_y(x) = f_y(x) - τ · log π_y

where π is the training class prior. Subtracting the log prior removes the bias towards head classes; the
Balanced Energy paper reports "Ours + AdjLogit" on CIFAR-LT this way (τ = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adjust_logits"]


def adjust_logits(logits: Tensor, class_prior: Tensor | Sequence[float], tau: float = 1.0) -> Tensor:
    """``logits - tau * log(prior)`` with ``prior`` L1-normalised (raw class counts are accepted).

    ``logits`` is (B, K) (or (K,)); the result is float32 (float64 stays float64). Every prior entry must be
    > 0 (a class with no training images has no defined adjustment).
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    prior = torch.as_tensor(class_prior, dtype=torch.float64)
    if prior.ndim != 1 or prior.numel() != x.shape[-1]:
        raise ValueError(f"class_prior must have one entry per class ({x.shape[-1]}), got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all() or (prior <= 0).any():
        raise ValueError(f"class_prior entries must be finite and > 0, got {prior.tolist()}")
    log_prior = (prior / prior.sum()).log().to(device=x.device, dtype=x.dtype)
    return x - tau * log_prior
