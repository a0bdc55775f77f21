"""The free energy of a classifier's logits (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x; f) = -T * log sum_j exp(f_j(x) / T), per row of ``logits`` (shape (B, K) -> (B,)).

    Low energy = in-distribution. The *score* convention of oodtune (higher = more ID) is ``-energy``.
    Computed in float32 even for bf16 logits so that large margins (|E| ~ 20) keep their precision;
    float64 logits stay float64 (for numerical gradient checks).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    return -temperature * torch.logsumexp(x / temperature, dim=1)
