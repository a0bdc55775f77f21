"""PNG figures in the style of the papers (matplotlib, Agg; no pyplot state, nothing left open).

* ``plot_energy_histograms`` — Figure 1 of the sparsity fine-tuning paper: the distribution of the energy
  E(x) = -T log sum_c exp(f_c(x)/T) on ID (green) and OOD (red) data, before and after fine-tuning; the
  overlap of the curves is where ID and OOD cannot be told apart.
* ``plot_roc_curves`` — Figure 2: ROC curves (TPR against FPR) of several models, e.g. pre-trained
  (blue) and fine-tuned (orange); better detectors bend towards the upper-left corner.
* ``plot_class_prior`` — Balanced Energy: ID class counts next to the outlier class prior
  P(y|o) = (1/|O|) sum_{o in O} [argmax_c f_c(o) = y] estimated by the pre-trained model.
* ``plot_anomaly_maps`` — anomaly segmentation: per frame, the image | its ground truth (anomaly red, void black)
  | the energy map before | after fine-tuning (one colour scale per frame, bright = high energy = anomalous).

Figures are ``matplotlib.figure.Figure`` objects drawn by an explicit Agg canvas: headless, the global
backend is never switched, nothing registers with pyplot and no figure stays open after a call (safe in
long benchmark loops, notebooks and threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ConfigError

ID_COLOR = "tab:green"
OOD_CMAP = "Reds"
DPI = 150

EnergySets = tuple[Any, Mapping[str, Any]]


def _finite(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ConfigError(f"{what} is empty; nothing to plot.")
    if not np.isfinite(a).all():
        raise ConfigError(f"{what} contains NaN/inf values; drop them before plotting.")
    return a


def _save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach the Agg renderer to this figure only
    fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    return out


def _ood_colors(n: int) -> list[Any]:
    """Shades of red, darkest first, one per OOD set."""
    cmap = matplotlib.colormaps[OOD_CMAP]
    return [cmap(v) for v in np.linspace(0.85, 0.4, n)] if n > 1 else [cmap(0.8)]


def _energy_panel(ax: Axes, id_energy: Any, ood_energies: Mapping[str, Any], title: str) -> None:
    """Density histograms of the energy on shared bins: ID filled green, each OOD set a red step curve."""
    e_id = _finite(id_energy, "id_energy")
    if not ood_energies:
        raise ConfigError("ood_energies is empty; pass at least one OOD set, e.g. {'svhn': energies}.")
    e_ood = {name: _finite(v, f"ood_energies[{name!r}]") for name, v in ood_energies.items()}
    bins = np.histogram_bin_edges(np.concatenate([e_id, *e_ood.values()]), bins=80).tolist()
    ax.hist(e_id, bins=bins, density=True, color=ID_COLOR, alpha=0.35, label="ID")
    ax.hist(e_id, bins=bins, density=True, color=ID_COLOR, histtype="step", linewidth=1.5)
    for (name, e), color in zip(e_ood.items(), _ood_colors(len(e_ood)), strict=False):
        ax.hist(e, bins=bins, density=True, color=color, histtype="step", linewidth=1.5, label=f"OOD: {name}")
    ax.set_xlabel("energy E(x)  (lower = more in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="small")


def plot_energy_histograms(path: str | Path, id_energy: Any, ood_energies: Mapping[str, Any], *,
                           title: str = "Energy distribution", before: EnergySets | None = None) -> Path:
    """Energy histograms ID (green) vs OOD (red); with ``before=(id_energy, ood_energies)`` of the model
    before fine-tuning, two panels "before" | "after" (the sparsity paper's Figure 1). Returns the path."""
    panels = [("before fine-tuning", *before), ("after fine-tuning", id_energy, ood_energies)] if before \
        else [("", id_energy, ood_energies)]
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for ax, (label, e_id, e_ood) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=False):
        _energy_panel(ax, e_id, e_ood, label)
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc_curves(path: str | Path, curves: Mapping[str, tuple[Any, Any]], title: str = "ROC") -> Path:
    """ROC curves, one per label (``curves[label] = (fpr, tpr)``, the first two arrays of
    ``oodtune.metrics.roc_curve``);
    the legend shows each curve's AUROC = integral of TPR d(FPR) (trapezoidal). Returns the path."""
    if not curves:
        raise ConfigError("curves is empty; pass {label: (fpr, tpr)} for at least one model.")
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    for label, (fpr, tpr) in curves.items():
        f, t = _finite(fpr, f"fpr of {label!r}"), _finite(tpr, f"tpr of {label!r}")
        if f.shape != t.shape:
            raise ConfigError(f"{label!r}: fpr has {f.size} points but tpr has {t.size}; pass matching arrays.")
        area = float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2))
        ax.plot(f, t, linewidth=1.8, label=f"{label} (AUROC {100 * area:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_class_prior(path: str | Path, id_counts: Sequence[float], outlier_prior: Sequence[float],
                     class_names: Sequence[str]) -> Path:
    """Bar charts side by side: ID training count per class | outlier prior P(y|o) per class (same class
    order). Shows whether the auxiliary outliers concentrate on the head or the tail classes."""
    counts = np.asarray(id_counts, dtype=np.float64).ravel()
    prior = np.asarray(outlier_prior, dtype=np.float64).ravel()
    names = [str(n) for n in class_names]
    if not (counts.size == prior.size == len(names)) or not names:
        raise ConfigError(f"id_counts ({counts.size}), outlier_prior ({prior.size}) and class_names ({len(names)}) "
                         "must have one non-empty entry per class.")
    if not (np.isfinite(counts).all() and np.isfinite(prior).all()):
        raise ConfigError("id_counts and outlier_prior must be finite.")
    x = np.arange(len(names))
    fig = Figure(figsize=(max(8.0, 0.5 * len(names)), 4.0), layout="constrained")
    ax_counts, ax_prior = fig.subplots(1, 2)
    ax_counts.bar(x, counts, color=ID_COLOR)
    ax_counts.set(title="ID training samples per class", ylabel="count")
    ax_prior.bar(x, prior, color=_ood_colors(1)[0])
    ax_prior.axhline(1.0 / len(names), color="grey", linestyle="--", linewidth=0.8, label="uniform 1/K")
    ax_prior.set(title="outlier class prior P(y|o)", ylabel="probability")
    ax_prior.legend(fontsize="small")
    for ax in (ax_counts, ax_prior):
        ax.set_xticks(x, names, rotation=45 if len(names) <= 20 else 90, ha="right" if len(names) <= 20 else "center",
                      fontsize="small" if len(names) <= 20 else 5)
    return _save(fig, path)


def plot_anomaly_maps(path: str | Path, frames: Any, labels: Any, before: Any, after: Any, *,
                      title: str = "anomaly maps") -> Path:
    """Rows of image | ground truth | energy before | energy after for (n, H, W, 3) uint8 ``frames``, (n, H, W)
    ``labels`` (0 = in-distribution, 1 = anomaly, 255 = void) and (n, H, W) energy maps. Returns the path."""
    imgs, labs = np.asarray(frames), np.asarray(labels)
    e_before, e_after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    n = len(imgs)
    if not (n and imgs.ndim == 4 and labs.shape == imgs.shape[:3] == e_before.shape == e_after.shape):
        raise ConfigError(f"frames {imgs.shape}, labels {labs.shape} and energy maps {e_before.shape} / "
                          f"{e_after.shape} must describe the same n >= 1 frames.")
    gt = np.zeros((*labs.shape, 3))
    gt[labs == 0] = (0.55, 0.55, 0.55)
    gt[labs == 1] = (0.9, 0.1, 0.1)
    aspect = imgs.shape[2] / imgs.shape[1]
    fig = Figure(figsize=(4 * 1.5 * aspect, 1.5 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        lo = float(min(_finite(e_before[i], "before").min(), _finite(e_after[i], "after").min()))
        hi = float(max(e_before[i].max(), e_after[i].max()))
        panels = [(imgs[i], "image", None), (gt[i], "ground truth", None), (e_before[i], "energy before", "magma"),
                  (e_after[i], "energy after", "magma")]
        for ax, (img, name, cmap) in zip(axes[i], panels, strict=True):
            ax.imshow(img, cmap=cmap, vmin=lo if cmap else None, vmax=hi if cmap else None)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path, dpi=100)
