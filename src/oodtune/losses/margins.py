"""Propose the energy margins m_in / m_out from the *pretrained* model's energies.

The energy hinge losses (Liu et al. 2020; Balanced Energy) only act on samples on the wrong side of a margin:
ID samples with E(x_in) > m_in are pushed down, outliers with E(x_out) < m_out are pushed up. So that
fine-tuning has something to do at the start, most samples of both sets should be on the wrong side:

    m_in  = Q_ID(id_quantile)        (default the 10% quantile: ~90% of ID train samples are pushed down)
    m_out = Q_out(out_quantile)      (default the 90% quantile: ~90% of auxiliary outliers are pushed up)

and we require m_out - m_in >= min_gap (widened symmetrically about the midpoint otherwise; with a poorly
separating model the two quantiles can cross).

Comparison with the reference: the Energy paper's CIFAR-10 WRN-40-2 margins m_in=-23, m_out=-5 were
grid-searched (m_in ∈ {-15..-27}, m_out ∈ {-3..-7}) on top of a pretrained model whose ID energies sit
around -8..-12 and outlier energies around -5..-8. Our m_out lands near -5; our m_in (≈ -12) is more
conservative than -23, which pushes *every* ID sample down by ~10 units — use ``id_quantile`` close to 0, or
the reference values, for the aggressive setting. The proposal is a starting point, not a tuned value.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["FAR", "REFERENCE_MEDIANS", "default_margin_warning", "margin_coverage", "propose_margins"]


def _energies(values: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    e = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, np.float64)
    e = e.reshape(-1).astype(np.float64)
    if e.size == 0:
        raise ConfigError(f"no {what} energies given")
    if not np.isfinite(e).all():
        raise ConfigError(f"{what} energies contain NaN/inf; check the model and data")
    return e


def _check_quantile(q: float, name: str) -> None:
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {q}")


def propose_margins(id_energy: torch.Tensor | np.ndarray, outlier_energy: torch.Tensor | np.ndarray, *,
                    id_quantile: float = 0.1, out_quantile: float = 0.9, min_gap: float = 1.0) -> tuple[float, float]:
    """(m_in, m_out) = (Q_ID(id_quantile), Q_out(out_quantile)), at least ``min_gap`` apart (module docstring).

    Energies are E(x) = -logsumexp f(x) (low = ID), e.g. :func:`oodtune.functional.energy` of the pretrained
    model's logits on the ID *train* split and on the auxiliary outlier set.
    """
    _check_quantile(id_quantile, "id_quantile")
    _check_quantile(out_quantile, "out_quantile")
    if not min_gap > 0:
        raise ConfigError(f"min_gap must be > 0, got {min_gap}")
    m_in = float(np.quantile(_energies(id_energy, "ID"), id_quantile))
    m_out = float(np.quantile(_energies(outlier_energy, "outlier"), out_quantile))
    if m_out - m_in < min_gap:
        mid = (m_in + m_out) / 2
        m_in, m_out = mid - min_gap / 2, mid + min_gap / 2
    return m_in, m_out


def margin_coverage(id_energy: torch.Tensor | np.ndarray, outlier_energy: torch.Tensor | np.ndarray,
                    m_in: float, m_out: float) -> tuple[float, float]:
    """Fractions of ID samples (E > m_in) and outliers (E < m_out) that the hinge terms act on."""
    e_in, e_out = _energies(id_energy, "ID"), _energies(outlier_energy, "outlier")
    return float((e_in > m_in).mean()), float((e_out < m_out).mean())


#: Median energies of the model the default margins (m_in = -23, m_out = -5, the Energy paper's CIFAR-10 values)
#: were grid-searched on: a WRN-40-2 with ID energies around -8..-12 and outliers around -5..-8 (module docstring).
REFERENCE_MEDIANS = {"m_in": -10.0, "m_out": -6.5}
#: How far (in energy units) a model's median may lie from those before the defaults are reported as unsuitable.
FAR = 5.0


def default_margin_warning(id_energy: torch.Tensor | np.ndarray, outlier_energy: torch.Tensor | np.ndarray,
                           defaults: dict[str, float]) -> str | None:
    """A warning when margins left at their CIFAR/WRN-40-2 defaults (``defaults``: option -> value in use) do not
    fit this model: its median ID (for m_in) or outlier (for m_out) energy is more than :data:`FAR` from the
    reference model's. None when they fit."""
    medians = {"m_in": float(np.median(_energies(id_energy, "ID"))),
               "m_out": float(np.median(_energies(outlier_energy, "outlier")))}
    far = [k for k in defaults if abs(medians[k] - REFERENCE_MEDIANS[k]) > FAR]
    if not far:
        return None
    used = ", ".join(f"{k} = {defaults[k]:g}" for k in defaults)
    return (f"the default margins ({used}) were tuned for a CIFAR-10 WRN-40-2 whose median energies are about "
            f"{REFERENCE_MEDIANS['m_in']:g} (ID) and {REFERENCE_MEDIANS['m_out']:g} (outliers); this model's are "
            f"{medians['m_in']:.2f} (ID train) and {medians['m_out']:.2f} (outliers). Pass --m-in auto --m-out auto "
            "(proposed from these energies, as `oodtune propose-margins` prints) or your own values.")
