"""What a diverging training run reports: where (epoch, step), what went non-finite (which loss term, or the
weights after an update), what to do (a lower learning rate), and which checkpoint is kept.

A run stops at the first non-finite loss (checked every step on the CPU, once per epoch where a per-step check
would sync a GPU or split a compiled graph; the step is then found from the per-step totals) or when the weights
are non-finite at the end of an epoch (an update of finite loss can still overflow them). The checkpoint of the
last finished epoch -- saved only after its weights were checked finite -- is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import DivergenceError

__all__ = ["describe_terms", "diverged", "first_non_finite", "non_finite_weights"]


def describe_terms(terms: Mapping[str, float | torch.Tensor]) -> str:
    """'non-finite term(s) energy=inf; finite: ce=2.31' for loss terms by name."""
    values = {k: float(v) for k, v in terms.items()}
    bad = [f"{k}={v:.4g}" for k, v in values.items() if not math.isfinite(v)]
    good = [f"{k}={v:.4g}" for k, v in values.items() if math.isfinite(v)]
    return f"non-finite loss term(s) {', '.join(bad) or '(none)'}" + (f"; finite: {', '.join(good)}" if good else "")


def first_non_finite(totals: Sequence[torch.Tensor]) -> int:
    """The 1-based index of the first non-finite value in ``totals`` (0 if all are finite); one sync."""
    if not totals:
        return 0
    bad = torch.nonzero(~torch.isfinite(torch.stack([t.float() for t in totals]))).flatten()
    return int(bad[0]) + 1 if bad.numel() else 0


def non_finite_weights(net: nn.Module) -> list[str]:
    """Names of the parameters holding NaN/inf (one sync)."""
    named = list(net.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def diverged(epoch: int, step: int, what: str, *, lr: float, last: Path | None) -> DivergenceError:
    """The error of a run that diverged in ``epoch`` (0-based, = epochs finished before it) at ``step`` (1-based)."""
    kept = (f"the last good checkpoint (after epoch {epoch}) is kept: {last}" if epoch > 0 and last is not None
            else "no epoch had finished, so no checkpoint was written")
    return DivergenceError(f"training diverged in epoch {epoch + 1}, step {step}: {what}. Lower the learning rate "
                           f"(it was {lr:g}; try 10x lower), or check the loss options (energy margins: `oodtune "
                           f"propose-margins`); {kept}.")
