"""PNG figures in the style of the papers (matplotlib, Agg; no pyplot state, nothing left open).

* ``plot_energy_histograms`` — Figure 1 of the sparsity fine-tuning paper: the distribution of the energy
  E(x) = -T log sum_c exp(f_c(x)/T) on ID and on each OOD set, before and after fine-tuning, on shared bins and
  shared axes; the overlap of the curves is where ID and OOD cannot be told apart. ``plot_score_histograms``
  draws the same for any score (higher = more in-distribution).
* ``plot_roc_curves`` — Figure 2: ROC curves (TPR against FPR), one per (model, OOD set) — colour = OOD set,
  line style = model — optionally on a log FPR axis; better detectors bend towards the upper-left corner.
* ``plot_class_prior`` — Balanced Energy: ID class counts next to the outlier class prior
  P(y|o) = (1/|O|) sum_{o in O} [argmax_c f_c(o) = y] estimated by the pre-trained model, and the
  P_γ = normalise(P^γ) the loss actually uses.
* ``plot_forest`` — the paired differences of a benchmark's comparisons with their 95 % CIs, one panel per metric
  (a forest plot): the dot is the difference, the bar the CI, the dashed line 0; colour = verdict.
* ``plot_anomaly_maps`` — anomaly segmentation: per frame, the image | its ground truth (anomaly red, void black)
  | score maps (e.g. before | after fine-tuning; one colour scale and colour bar per frame, bright = low score =
  anomalous).

Every score axis and colour bar says its direction; energy is always drawn as the energy score -E (higher = more
in-distribution), like every oodtune score.

Colours come from the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies); ID data
is black. Legends give each OOD set's AUROC. Names that hold a path (``folder:PATH``) are shortened to their
last component.

Figures are ``matplotlib.figure.Figure`` objects drawn by an explicit Agg canvas: headless, the global
backend is never switched, nothing registers with pyplot and no figure stays open after a call (safe in
long benchmark loops, notebooks and threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ConfigError
from .metrics import auroc

#: Okabe & Ito's colour-blind-safe palette (without black, which is ID), most distinct colours first.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
ID_COLOR = "#000000"
DPI = 150
LINESTYLES = ("--", "-", ":", "-.")

EnergySets = tuple[Any, Mapping[str, Any]]
#: How every axis names the score direction, and the energy score (one convention: -E, higher = more ID).
HIGHER_IS_ID = "higher = more in-distribution"
ENERGY_LABEL = "energy score -E(x)"


def score_label(score: str) -> str:
    """The axis name of a score: ``energy`` is the energy score -E(x); others keep their name."""
    return ENERGY_LABEL if score == "energy" else f"{score} score"


def short_name(name: str) -> str:
    """A legend-sized name: ``folder:/a/b/set`` -> ``folder:set``, ``/a/b/model.pt`` -> ``b/model.pt``."""
    kind, sep, rest = name.partition(":")
    if sep and kind in ("folder", "images"):
        return f"{kind}:{Path(rest).name or rest}"
    if "/" in name or "\\" in name:
        p = Path(name)
        return f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    return name


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


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


def _histogram_figure(path: str | Path, panels: Sequence[tuple[str, Any, Mapping[str, Any]]], *, xlabel: str,
                      title: str, aurocs: Mapping[str, float] | None = None, note: str = "") -> Path:
    """One panel per (label, ID values, {OOD set: values}) of a score (higher = more in-distribution); all panels
    share bins and both axes. The legend's AUROC of a set is ``aurocs[set]`` (%) when given (the table's number,
    e.g. over all pixels while the histogram shows a sample: say so in ``note``), else computed from the values."""
    checked = []
    for label, v_id, v_ood in panels:
        if not v_ood:
            raise ConfigError("ood_energies is empty; pass at least one OOD set, e.g. {'svhn': energies}.")
        checked.append((label, _finite(v_id, "id_energy"),
                        {n: _finite(v, f"ood_energies[{n!r}]") for n, v in v_ood.items()}))
    values = np.concatenate([a for _, v_id, v_ood in checked for a in (v_id, *v_ood.values())])
    bins = np.histogram_bin_edges(values, bins=80).tolist()
    fig = Figure(figsize=(5.5 * len(checked), 4.2), layout="constrained")
    axes = fig.subplots(1, len(checked), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (label, v_id, v_ood) in zip(axes, checked, strict=True):
        ax.hist(v_id, bins=bins, density=True, color=ID_COLOR, alpha=0.15)
        ax.hist(v_id, bins=bins, density=True, color=ID_COLOR, histtype="step", linewidth=1.6, label="ID")
        for i, (name, v) in enumerate(v_ood.items()):
            area = aurocs[name] if aurocs and name in aurocs else 100 * auroc(v_id, v)
            ax.hist(v, bins=bins, density=True, color=_color(i), histtype="step", linewidth=1.5,
                    label=f"{short_name(name)} (AUROC {area:.1f})")
        ax.set_xlabel(xlabel)
        ax.set_title(label)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("density")
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize="medium")
    return _save(fig, path)


def plot_energy_histograms(path: str | Path, id_energy: Any, ood_energies: Mapping[str, Any], *,
                           title: str = "Energy distribution", before: EnergySets | None = None) -> Path:
    """Histograms of the energies E(x) given, drawn as the energy score -E(x) (higher = more in-distribution, the
    convention of every oodtune plot and score), ID (black) vs each OOD set (one colour each, AUROC in the legend);
    with ``before=(id_energy, ood_energies)`` of the model before fine-tuning, two panels "before" | "after" on
    the same bins and axes (the sparsity paper's Figure 1). Returns the path."""
    def negated(id_e: Any, ood_e: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
        return -_finite(id_e, "id_energy"), {n: -_finite(v, f"ood_energies[{n!r}]") for n, v in ood_e.items()}

    panels = [("before fine-tuning", *negated(*before)), ("after fine-tuning", *negated(id_energy, ood_energies))] \
        if before else [("", *negated(id_energy, ood_energies))]
    return _histogram_figure(path, panels, xlabel=f"{ENERGY_LABEL}  ({HIGHER_IS_ID})", title=title)


def plot_score_histograms(path: str | Path, id_scores: Any, ood_scores: Mapping[str, Any], *, score: str,
                          title: str = "", aurocs: Mapping[str, float] | None = None, note: str = "") -> Path:
    """Histograms of a score (higher = more in-distribution), ID vs each OOD set, AUROC in the legend
    (``aurocs``/``note``: see :func:`_histogram_figure`)."""
    return _histogram_figure(path, [("", id_scores, ood_scores)], xlabel=f"{score_label(score)}  ({HIGHER_IS_ID})",
                             title=title or f"{score} score", aurocs=aurocs, note=note)


def plot_calibration(path: str | Path, scores: Any, threshold: float, *, score: str, tpr: float,
                     check_scores: Any = None, unit: str = "images", title: str = "") -> Path:
    """Histogram of the calibration ``scores`` (higher = more in-distribution; and of ``check_scores``, the ID
    test set's, when given) with the threshold drawn: everything left of it is flagged. Returns the path."""
    cal = _finite(scores, "scores")
    sets = {f"calibration {unit} (n = {cal.size:,})": cal}
    if check_scores is not None:
        check = _finite(check_scores, "check_scores")
        sets[f"ID test {unit}, the check (n = {check.size:,})"] = check
    bins = np.histogram_bin_edges(np.concatenate([*sets.values(), [threshold]]), bins=80).tolist()
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (label, values) in enumerate(sets.items()):
        ax.hist(values, bins=bins, density=True, color=ID_COLOR if i == 0 else _color(1), alpha=0.25 if i == 0 else 1,
                histtype="stepfilled" if i == 0 else "step", linewidth=1.5, label=label)
    ax.axvline(threshold, color=_color(3), linewidth=1.8,
               label=f"threshold {threshold:.4g}: accepts {100 * tpr:g}% (left of it = flagged)")
    ax.set(xlabel=f"{score_label(score)}  ({HIGHER_IS_ID})", ylabel="density", title=title or "calibration")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_roc_curves(path: str | Path, curves: Mapping[Any, Sequence[Any]], title: str = "ROC", *,
                    log_fpr: bool = False, aurocs: Mapping[Any, float] | None = None, note: str = "") -> Path:
    """ROC curves, ``curves[key] = (fpr, tpr, ...)`` as ``oodtune.metrics.roc_curve`` returns them (arrays after
    the first two, e.g. thresholds, are not drawn). A key is
    a label, or a ``(model, OOD set)`` pair: then the colour marks the set and the line style the model (the
    first model dashed). The legend shows each curve's AUROC = integral of TPR d(FPR) (trapezoidal). ``log_fpr``
    puts FPR on a log axis (the low-FPR end, where detectors are used, becomes visible). ``aurocs[key]`` (%)
    replaces a curve's own area in the legend (the table's number when the curve is drawn from a sample; say so
    in ``note``, shown under the title). Returns the path."""
    if not curves:
        raise ConfigError("curves is empty; pass {label: (fpr, tpr)} for at least one model.")
    keys = [k if isinstance(k, tuple) else (k, "") for k in curves]
    models = list(dict.fromkeys(m for m, _ in keys))
    sets = list(dict.fromkeys(d for _, d in keys))
    fig = Figure(figsize=(7.5, 5) if len(curves) > 4 else (5, 5), layout="constrained")
    ax = fig.subplots()
    smallest = 1.0
    for key, (model, name) in zip(curves, keys, strict=True):
        fpr, tpr = curves[key][:2]
        label = f"{short_name(name)}: {model}" if name else short_name(str(model))
        f, t = _finite(fpr, f"fpr of {label!r}"), _finite(tpr, f"tpr of {label!r}")
        if f.shape != t.shape:
            raise ConfigError(f"{label!r}: fpr has {f.size} points but tpr has {t.size}; pass matching arrays.")
        area = aurocs[key] / 100 if aurocs and key in aurocs else float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2))
        smallest = min(smallest, float(f[f > 0].min()) if (f > 0).any() else 1.0)
        color = _color(sets.index(name)) if name else _color(models.index(model))
        style = LINESTYLES[models.index(model) % len(LINESTYLES)] if name and len(models) > 1 else "-"
        ax.plot(f, t, color=color, linestyle=style, linewidth=1.6, label=f"{label} (AUROC {100 * area:.1f})")
    chance = np.geomspace(smallest, 1, 50) if log_fpr else np.array([0.0, 1.0])
    ax.plot(chance, chance, color="grey", linestyle=":", linewidth=0.8, label="chance")
    ax.set(ylim=(0, 1.01), xlabel="false positive rate" + (" (log scale)" if log_fpr else ""),
           ylabel="true positive rate", title=f"{title}\n{note}" if note else title)
    if log_fpr:
        ax.set_xscale("log")
        ax.set_xlim(smallest, 1)
    else:
        ax.set_xlim(0, 1)
    if len(curves) > 4:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    else:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_class_prior(path: str | Path, id_counts: Sequence[float], outlier_prior: Sequence[float],
                     class_names: Sequence[str], *, gamma_priors: Mapping[float, Sequence[float]] | None = None
                     ) -> Path:
    """Bar charts side by side: ID training count per class | outlier prior P(y|o) per class (same class
    order), next to it the P_γ = normalise(P^γ) of each γ in ``gamma_priors`` (what the Balanced Energy loss
    uses). Shows whether the auxiliary outliers concentrate on the head or the tail classes, and how much of
    that γ keeps."""
    counts = np.asarray(id_counts, dtype=np.float64).ravel()
    priors = {"P(y|o), γ = 1 (estimated)": np.asarray(outlier_prior, dtype=np.float64).ravel()}
    priors |= {f"P_γ, γ = {g:g} (used by the loss)": np.asarray(v, dtype=np.float64).ravel()
               for g, v in (gamma_priors or {}).items()}
    names = [str(n) for n in class_names]
    if not names or counts.size != len(names) or any(p.size != len(names) for p in priors.values()):
        raise ConfigError(f"id_counts ({counts.size}), each prior ({[p.size for p in priors.values()]}) and "
                          f"class_names ({len(names)}) must have one non-empty entry per class.")
    if not (np.isfinite(counts).all() and all(np.isfinite(p).all() for p in priors.values())):
        raise ConfigError("id_counts and the priors must be finite.")
    x = np.arange(len(names))
    fig = Figure(figsize=(max(9.0, 0.6 * len(names)), 4.0), layout="constrained")
    ax_counts, ax_prior = fig.subplots(1, 2)
    ax_counts.bar(x, counts, color=ID_COLOR)
    ax_counts.set(title="ID training samples per class", ylabel="count")
    width = 0.8 / len(priors)
    for i, (label, p) in enumerate(priors.items()):
        ax_prior.bar(x + (i - (len(priors) - 1) / 2) * width, p, width=width, color=_color(i), label=label)
    ax_prior.axhline(1.0 / len(names), color="grey", linestyle="--", linewidth=0.8, label="uniform 1/K")
    ax_prior.set(title="outlier class prior", ylabel="probability")
    ax_prior.legend(fontsize="small")
    for ax in (ax_counts, ax_prior):
        ax.set_xticks(x, names, rotation=45 if len(names) <= 20 else 90, ha="right" if len(names) <= 20 else "center",
                      fontsize="small" if len(names) <= 20 else 5)
    return _save(fig, path)


def plot_anomaly_maps(path: str | Path, frames: Any, labels: Any, maps: Mapping[str, Any], *, score: str = "energy",
                      title: str = "anomaly maps") -> Path:
    """Rows of image | ground truth | one score map per entry of ``maps`` (column title -> (n, H, W) per-pixel
    scores, higher = more in-distribution) for (n, H, W, 3) uint8 ``frames`` and (n, H, W) ``labels`` (0 =
    in-distribution, 1 = anomaly, 255 = void). The maps of a row share one colour scale, reversed magma so that
    bright = low score = anomalous, with a colour bar per row and the score and its direction named below the rows.
    Returns the path."""
    imgs, labs = np.asarray(frames), np.asarray(labels)
    arrays = {name: np.asarray(m, dtype=np.float64) for name, m in maps.items()}
    n = len(imgs)
    if not (n and arrays and imgs.ndim == 4 and all(labs.shape == imgs.shape[:3] == a.shape for a in arrays.values())):
        raise ConfigError(f"frames {imgs.shape}, labels {labs.shape} and score maps "
                          f"{[a.shape for a in arrays.values()]} must describe the same n >= 1 frames.")
    gt = np.zeros((*labs.shape, 3))
    gt[labs == 0] = (0.55, 0.55, 0.55)
    gt[labs == 1] = (0.9, 0.1, 0.1)
    aspect = imgs.shape[2] / imgs.shape[1]
    cols = 2 + len(arrays)
    fig = Figure(figsize=(cols * 1.5 * aspect + 1.0, 1.5 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        lo = min(float(_finite(a[i], name).min()) for name, a in arrays.items())
        hi = max(float(a[i].max()) for a in arrays.values())
        axes[i][0].imshow(imgs[i])
        axes[i][1].imshow(gt[i])
        shown = [ax.imshow(a[i], cmap="magma_r", vmin=lo, vmax=hi)
                 for ax, a in zip(axes[i][2:], arrays.values(), strict=True)]
        fig.colorbar(shown[0], ax=list(axes[i][2:]), shrink=0.9)
        for ax in axes[i]:
            ax.set_axis_off()
    for ax, name in zip(axes[0], ["image", "ground truth (red = anomaly)", *arrays], strict=True):
        ax.set_title(name if name in ("image", "ground truth (red = anomaly)") else f"{name}\n(bright = anomalous)",
                     fontsize="small")
    fig.suptitle(title, fontsize="medium")
    # named once below the rows: a label per row's colour bar is taller than the bar and runs into the next one
    fig.supxlabel(f"colour: {score_label(score)} ({HIGHER_IS_ID}); one scale per row, its bar on the right",
                  fontsize="small")
    return _save(fig, path, dpi=100)


#: Colour of each verdict in a forest plot.
VERDICT_COLORS = {"established": "#009E73", "refuted": "#D55E00", "not established": "#7F7F7F"}


def plot_forest(path: str | Path, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                headers: Mapping[str, str], *, title: str = "") -> Path:
    """A forest plot: per ``metric`` a panel, per (``comparison``, ``group``) a line with the ``difference`` (dot)
    and the CI ``low``..``high`` (bar), coloured by ``verdict``; the x axis notes which side favours the first
    method (higher AUROC/AUPR, lower FPR). ``rows`` carry those keys and ``metric``. Returns the path."""
    if not rows:
        raise ConfigError("no comparison rows to plot; finish at least one run of both rows of a comparison.")
    lines = list(dict.fromkeys((r["comparison"], r["group"]) for r in rows))
    fig = Figure(figsize=(3.2 * len(metrics) + 2.5, 0.35 * len(lines) + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    for ax, metric in zip(axes, metrics, strict=True):
        for r in (r for r in rows if r["metric"] == metric):
            y = len(lines) - 1 - lines.index((r["comparison"], r["group"]))
            color = VERDICT_COLORS.get(r["verdict"], ID_COLOR)
            ax.plot([r["low"], r["high"]], [y, y], color=color, linewidth=2)
            ax.plot([r["difference"]], [y], "o", color=color, markersize=4)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
        side = "→" if metric.startswith("au") else "←"
        ax.set_xlabel(f"{headers.get(metric, metric)}\ndifference (points; {side} first better)", fontsize="small")
    axes[0].set_yticks(range(len(lines)), [f"{c} · {g}" for c, g in reversed(lines)], fontsize="small")
    handles = [axes[0].plot([], [], "o-", color=c, label=v)[0] for v, c in VERDICT_COLORS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
