"""Results as Markdown tables and JSON files (written atomically, never silently overwritten): the generic
table/JSON writers, and the files of one evaluation (``oodtune evaluate --out`` / ``--plot``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .evaluation import METRIC_KEYS, EvalReport
from .metrics import roc_curve
from .models import RunMeta
from .plots import plot_roc_curves, plot_score_histograms

METRIC_LABELS = {"auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑", "fpr95": "FPR95↓"}


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers with ``digits`` decimals; (mean, std) pairs as 'mean ± std'; None (no value) as '–'; anything else
    as str."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if value is None:
        return "–"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``."""
    headers = list(headers or [METRIC_LABELS.get(c, c) for c in columns])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Pretty JSON, atomically; refuses to replace an existing file unless ``overwrite``."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def evaluation_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(OUT.json, OUT.md) for ``--out OUT``; a ``.json``/``.md`` suffix on OUT is dropped (``--out table.json``
    means table.json + table.md, not table.json.json)."""
    base = Path(out)
    if base.suffix in (".json", ".md"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".md")


def evaluation_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per (score, OOD set), then the per-score averages."""
    return [*report.rows, *report.averages()]


def evaluation_table(report: EvalReport) -> str:
    """The Markdown table of :func:`evaluation_rows`; the FPR95 header names its positive class."""
    fpr = f"FPR95↓ {'OOD' if report.positive == 'out' else 'ID'}+"
    return markdown_table(evaluation_rows(report), ["score", "dataset", *METRIC_KEYS],
                          ["score", "dataset", *[METRIC_LABELS[k] for k in METRIC_KEYS[:-1]], fpr])


def id_metrics_text(report: EvalReport, meta: RunMeta) -> str:
    """'ID accuracy (cifar10 test): 91.53%' style line(s) for the ID-task metrics."""
    names = {"accuracy": "ID accuracy"}
    return "\n".join(f"{names.get(k, k)} ({meta.dataset} test): {v:.2f}%" for k, v in report.id_metrics.items())


def write_evaluation(out: str | os.PathLike, report: EvalReport, meta: RunMeta, *, checkpoint: str | os.PathLike,
                     command: str, overwrite: bool = False) -> tuple[Path, Path]:
    """OUT.json (command, checkpoint, ID metrics, rows) and OUT.md (the same as a table); see
    :func:`evaluation_paths`."""
    js, md = evaluation_paths(out)
    data = {"command": command, "checkpoint": str(checkpoint), "id_dataset": meta.dataset, **report.id_metrics,
            "fpr95_positive": report.positive, "rows": evaluation_rows(report)}
    write_json(js, data, overwrite=overwrite)
    conv = ("OOD is the positive class: % of ID images flagged as OOD when 95% of the OOD images are flagged"
            if report.positive == "out" else
            "ID is the positive class: % of OOD images accepted as ID when 95% of the ID images are accepted")
    text = (f"# {Path(checkpoint).parent.name}\n\nCommand: `{command}`\n\n{id_metrics_text(report, meta)}\n\n"
            f"FPR95: {conv}.\n\n" + evaluation_table(report))
    write_text_atomic(md, text, overwrite=overwrite)
    return js, md


def evaluation_plot_paths(prefix: str | os.PathLike, scores: Sequence[str]) -> list[Path]:
    """PREFIX-SCORE-hist.png and PREFIX-SCORE-roc.png for each score."""
    base = Path(prefix)
    return [base.with_name(f"{base.name}-{s}-{kind}.png") for s in scores for kind in ("hist", "roc")]


def write_evaluation_plots(prefix: str | os.PathLike, report: EvalReport, *, title: str = "",
                           log_fpr: bool = False) -> list[Path]:
    """For each score of ``report``: histograms of the score on ID vs each OOD set and ROC curves per OOD set
    (AUROC in the legends; ``log_fpr``: log FPR axis). Returns the paths (:func:`evaluation_plot_paths`)."""
    paths = evaluation_plot_paths(prefix, list(report.scores))
    for i, (score, by_set) in enumerate(report.scores.items()):
        ood = {name: values for name, values in by_set.items() if name != "id"}
        plot_score_histograms(paths[2 * i], by_set["id"], ood, score=score, title=title)
        curves = {(score, name): roc_curve(by_set["id"], values) for name, values in ood.items()}
        plot_roc_curves(paths[2 * i + 1], curves, title=f"ROC per OOD set: {score} {title}".strip(), log_fpr=log_fpr)
    return paths
