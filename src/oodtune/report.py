"""Results as Markdown tables and JSON files (written atomically, never silently overwritten): the generic
table/JSON writers, and the files of one evaluation (``oodtune evaluate --out``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .evaluation import METRIC_KEYS, EvalReport
from .models import RunMeta

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
    """The Markdown table of :func:`evaluation_rows`."""
    return markdown_table(evaluation_rows(report), ["score", "dataset", *METRIC_KEYS])


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
            "rows": evaluation_rows(report), **({"selections": report.selections} if report.selections else {})}
    write_json(js, data, overwrite=overwrite)
    text = (f"# {Path(checkpoint).parent.name}\n\nCommand: `{command}`\n\n{id_metrics_text(report, meta)}\n\n"
            + evaluation_table(report))
    write_text_atomic(md, text, overwrite=overwrite)
    return js, md
