"""Balanced Energy step 1: the class prior of auxiliary outliers under the pretrained model.

Choi et al. (CVPR 2023), Algorithm 1, step 1: run the *pretrained* model over the auxiliary outlier set,
count N_i = #outliers predicted (argmax) as class i, then

    P(y=i|o)   = N_i / Σ_j N_j                                    (Eq. 3)
    P_γ(y=i|o) = P(y=i|o)^γ / Σ_j P(y=j|o)^γ        (L1-normalised power; γ=0 -> uniform, γ=1 -> P)

Zero counts: a class never predicted gets P_γ = 0 for γ > 0 and 1/K for γ = 0 (the convention 0⁰ = 1 of
``torch.pow``, which the reference code relies on for its CIFAR-100-LT prior, which has zero entries).
Such a class contributes nothing to Z_γ, i.e. outliers resembling it get the plain m_out margin.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, PriorError
from ..utils.atomic import write_text_atomic

__all__ = ["DEFAULT_GAMMA", "PriorError", "count_outlier_predictions", "prior_from_counts", "OutlierPrior"]

FORMAT = "oodtune-outlier-prior"
VERSION = 1
#: γ of the Balanced Energy paper's balanced CIFAR-10 runs: the default of ``oodtune estimate-prior --gamma``
#: (its long-tailed runs use 0.5).
DEFAULT_GAMMA = 0.05


def _logits_of(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def count_outlier_predictions(net: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]], batches: Iterable[Tensor],
                              num_classes: int) -> Tensor:
    """N_i: how many outliers the pretrained ``net`` predicts (argmax) as class i; int64 tensor of shape (K,).

    ``net`` returns logits or ``(logits, features)`` (a :class:`~oodtune.models.FeatureModel`). An
    ``nn.Module`` is run in eval mode (BatchNorm running stats, no dropout) under ``no_grad`` and put back in
    its previous mode afterwards. Batches are fed to ``net`` as they are (move/normalise them beforehand).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    was_training = isinstance(net, nn.Module) and net.training
    if isinstance(net, nn.Module):
        net.eval()
    counts = torch.zeros(num_classes, dtype=torch.int64)
    try:
        with torch.no_grad():
            for batch in batches:
                logits = _logits_of(net(batch))
                if logits.ndim != 2 or logits.shape[1] != num_classes:
                    raise ConfigError(f"expected logits of shape (B, {num_classes}), got {tuple(logits.shape)}")
                counts += torch.bincount(logits.argmax(dim=1).cpu(), minlength=num_classes)
    finally:
        if was_training:
            net.train()  # type: ignore[attr-defined]
    return counts


def _validated_counts(counts: Tensor | Sequence[int]) -> Tensor:
    c = torch.as_tensor(counts).detach().cpu()
    if c.ndim != 1 or c.numel() == 0:
        raise PriorError(f"counts must be a non-empty 1-D sequence (one per class), got shape {tuple(c.shape)}")
    if c.is_floating_point() and not torch.isfinite(c).all():
        raise PriorError(f"counts must be finite, got {c.tolist()}")
    if (c < 0).any():
        raise PriorError(f"counts must be non-negative, got {c.tolist()}")
    if c.sum() == 0:
        raise PriorError("all outlier counts are zero: no outlier predictions were counted. "
                         "Check that the auxiliary outlier set is not empty.")
    return c.to(torch.float64)


def prior_from_counts(counts: Tensor | Sequence[int], gamma: float = 1.0) -> Tensor:
    """P_γ(y|o) = L1-normalise((N_i / Σ N)^γ) as float32 (see the module docstring for γ=0 and zero counts)."""
    if not gamma >= 0:
        raise PriorError(f"gamma must be >= 0, got {gamma}")
    p = _validated_counts(counts)
    p = (p / p.sum()).pow(gamma)
    return (p / p.sum()).to(torch.float32)


@dataclass
class OutlierPrior:
    """Counts of the pretrained model's predictions on the auxiliary outliers, plus the γ to apply.

    ``class_names`` may be empty (then names are not checked); otherwise it has one name per count.
    """

    counts: list[int]
    gamma: float = 1.0
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = _validated_counts(self.counts)
        if (c != c.round()).any():
            raise PriorError(f"counts must be integers, got {list(self.counts)}")
        self.counts = [int(v) for v in c.tolist()]
        if not (isinstance(self.gamma, (int, float)) and self.gamma >= 0):
            raise PriorError(f"gamma must be a number >= 0, got {self.gamma!r}")
        self.gamma = float(self.gamma)
        self.class_names = [str(n) for n in self.class_names]
        if self.class_names and len(self.class_names) != len(self.counts):
            raise PriorError(f"{len(self.counts)} counts but {len(self.class_names)} class names; the prior must "
                             "come from a model with the same classes.")

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def probabilities(self) -> Tensor:
        """P(y=i|o) = N_i / Σ N (float32)."""
        return prior_from_counts(self.counts, 1.0)

    def gamma_prior(self) -> Tensor:
        """P_γ(y=i|o) (float32), the prior the Balanced Energy loss uses."""
        return prior_from_counts(self.counts, self.gamma)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``probabilities``/``gamma_prior`` are informational (recomputed on load)."""
        return {
            "format": FORMAT, "version": VERSION, "counts": list(self.counts), "gamma": self.gamma,
            "class_names": list(self.class_names), "probabilities": self.probabilities().tolist(),
            "gamma_prior": self.gamma_prior().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutlierPrior:
        if not isinstance(d, dict):
            raise PriorError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise PriorError(f"not an outlier prior (format {d.get('format')!r}, expected {FORMAT!r})")
        if not isinstance(d.get("counts"), list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in d["counts"]):
            raise PriorError("'counts' must be a list of integers (one per class)")
        names = d.get("class_names", [])
        if not isinstance(names, list):
            raise PriorError("'class_names' must be a list of strings")
        gamma = d.get("gamma", 1.0)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise PriorError(f"'gamma' must be a number, got {gamma!r}")
        return cls(counts=d["counts"], gamma=gamma, class_names=names)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write JSON atomically (temporary file in the same folder + ``os.replace``); returns the path.

        Refuses to replace an existing file unless ``overwrite=True``.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (or choose another path) to replace it.")
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> OutlierPrior:
        """Read a prior written by :meth:`save`; invalid files raise PriorError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"outlier prior {path} not found; create it with `oodtune estimate-prior`.")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PriorError(f"{path}: not valid JSON ({e}); re-create it with `oodtune estimate-prior`.") from e
        except PriorError as e:
            raise PriorError(f"{path}: {e}; re-create it with `oodtune estimate-prior`.") from e
