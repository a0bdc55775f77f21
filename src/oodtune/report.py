"""Results as Markdown tables, JSON and CSV files (written atomically, never silently overwritten): the generic
table/JSON writers, the files of one evaluation (``oodtune evaluate --out`` / ``--plot``) and of predictions
(``oodtune predict --out``). Every results file records the oodtune version, the metric convention and sample
counts."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError
from .evaluation.classification import METRIC_KEYS, EvalReport
from .metrics import DEFAULT_POSITIVE, metric_convention, roc_curve
from .models import RunMeta
from .plots import plot_roc_curves, plot_score_histograms, short_name
from .utils.atomic import csv_text, write_atomic, write_csv, write_text_atomic

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


def flat_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a CSV file: (mean, std) pairs become two columns, ``key`` and ``key_std``."""
    out = []
    for r in rows:
        flat: dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, (tuple, list)) and len(v) == 2:
                flat[k], flat[f"{k}_std"] = v
            else:
                flat[k] = v
        out.append(flat)
    return out


def provenance(positive: str = DEFAULT_POSITIVE) -> dict[str, Any]:
    """What every results file records besides its numbers: the oodtune version and the metric convention."""
    return {"oodtune_version": __version__, "metric_convention": metric_convention(positive)}


def evaluation_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(OUT.json, OUT.md, OUT.csv) for ``--out OUT``; a ``.json``/``.md``/``.csv`` suffix on OUT is dropped
    (``--out table.json`` means table.json + table.md + table.csv, not table.json.json)."""
    base = Path(out)
    if base.suffix in (".json", ".md", ".csv"):
        base = base.with_suffix("")
    return tuple(base.with_name(base.name + suffix) for suffix in (".json", ".md", ".csv"))  # type: ignore[return-value]


def scores_path(out: str | os.PathLike) -> Path:
    """OUT-scores.csv: the per-sample scores of ``evaluate --save-scores``."""
    json_path = evaluation_paths(out)[0]
    return json_path.with_name(json_path.stem + "-scores.csv")


def evaluation_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per (score, OOD set), then the per-score averages."""
    return [*report.rows, *report.averages()]


#: Secondary per-set metrics of segmentation rows (SegmentMeIfYouCan components) -> column header.
COMPONENT_LABELS = {"siou": "sIoU↑", "ppv": "PPV↑", "mean_f1": "mean F1↑"}


def evaluation_table(report: EvalReport) -> str:
    """The Markdown table of :func:`evaluation_rows`, with the OOD and ID test set sizes (segmentation: the frames of
    each anomaly set) and the component metrics when the rows have them; the FPR95 header names its positive class."""
    extra = [k for k in COMPONENT_LABELS if report.rows and all(k in r for r in report.rows)]
    pixels = any("anomaly_pixels" in r for r in report.rows)  # segmentation: the set's frames, no ID test set
    sizes, size_headers = (["n_ood"], ["frames"]) if pixels else (["n_ood", "n_id"], ["n OOD", "n ID"])
    columns = ["score", "dataset", *METRIC_KEYS, *extra]
    fpr = f"FPR95↓ {'OOD' if report.positive == 'out' else 'ID'}+"
    headers = [fpr if c == "fpr95" else METRIC_LABELS.get(c, COMPONENT_LABELS.get(c, c)) for c in columns]
    return markdown_table(evaluation_rows(report), [*columns, *sizes], [*headers, *size_headers])


def id_metrics_text(report: EvalReport, meta: RunMeta) -> str:
    """'ID accuracy (cifar10 test): 91.53%' style line(s) for the ID-task metrics."""
    names = {"accuracy": ("ID accuracy", ""), "miou": ("ID mIoU", ", argmax over all outputs"),
             "miou_classes": ("ID mIoU", ", argmax over the classes only"), "pixel_accuracy": ("ID pixel accuracy", ""),
             "pixel_accuracy_classes": ("ID pixel accuracy", ", argmax over the classes only")}
    return "\n".join(f"{names.get(k, (k, ''))[0]} ({meta.dataset} test{names.get(k, (k, ''))[1]}): {v:.2f}%"
                     for k, v in report.id_metrics.items())


def write_scores(path: str | os.PathLike, report: EvalReport, *, overwrite: bool = False) -> Path:
    """Per-sample scores as CSV: one row per image (dataset, index in it, one column per score; higher = more
    in-distribution); ``dataset`` is ``id`` for the ID test set."""
    names = list(report.scores)
    datasets = list(report.scores[names[0]]) if names else []
    rows = [{"dataset": d, "index": i, **{s: float(report.scores[s][d][i]) for s in names}}
            for d in datasets for i in range(len(report.scores[names[0]][d]))]
    return write_csv(path, rows, ["dataset", "index", *names], overwrite=overwrite)


def write_evaluation(out: str | os.PathLike, report: EvalReport, meta: RunMeta, *, checkpoint: str | os.PathLike,
                     command: str, overwrite: bool = False, save_scores: bool = False) -> list[Path]:
    """OUT.json (command, checkpoint, version, metric convention, ID metrics, rows with sample counts), OUT.md (the
    same as a table), OUT.csv (the rows) and, with ``save_scores``, OUT-scores.csv; see :func:`evaluation_paths`."""
    js, md, csv_path = evaluation_paths(out)
    data = {"command": command, "checkpoint": str(checkpoint), **provenance(report.positive),
            "id_dataset": meta.dataset, **report.id_metrics, "rows": evaluation_rows(report),
            "precision": {"training": meta.precision, "evaluation": report.precision},
            **({"selections": report.selections} if report.selections else {})}
    write_json(js, data, overwrite=overwrite)
    convention = metric_convention(report.positive)
    text = (f"# {Path(checkpoint).parent.name}\n\nCommand: `{command}`\n\noodtune {__version__}. Metrics in %; "
            f"positive class {convention['positive_class']}: {convention['fpr_rule']}.\n\n"
            f"{id_metrics_text(report, meta)}\n\n" + evaluation_table(report))
    paths = [js, write_text_atomic(md, text, overwrite=overwrite),
             write_csv(csv_path, evaluation_rows(report), ["score", "dataset", *METRIC_KEYS, "n_ood", "n_id"],
                       overwrite=overwrite)]
    if save_scores:
        paths.append(write_scores(scores_path(out), report, overwrite=overwrite))
    return paths


#: Columns of a predictions file (``oodtune predict``).
PREDICTION_COLUMNS = ("path", "predicted_class", "confidence", "score", "margin", "p_value", "is_ood", "error")
PREDICTION_FORMATS = ("csv", "jsonl")
#: First characters that make a spreadsheet (Excel, LibreOffice, Sheets) read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would execute as a formula (it starts with ``= + - @``, a tab or a carriage
    return) prefixed with ``'`` (OWASP "CSV injection"); numbers, booleans, None and other text unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def prediction_format(path: str | os.PathLike | None, fmt: str | None) -> str:
    """``fmt``, else from the file suffix (.jsonl / .ndjson -> jsonl), else csv."""
    if fmt is not None:
        return fmt
    return "jsonl" if path is not None and Path(path).suffix.lower() in (".jsonl", ".ndjson") else "csv"


def prediction_lines(rows: Iterable[dict[str, Any]], fmt: str, counts: Counter[str]) -> Iterator[str]:
    """``rows`` as CSV (with a header) or JSON Lines text, one line at a time; ``counts`` tallies ood / id /
    error rows as they pass. CSV text cells go through :func:`spreadsheet_safe`; JSON Lines are exact."""
    if fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"unknown predictions format {fmt!r}; use one of {', '.join(PREDICTION_FORMATS)}.")
    if fmt == "csv":
        yield csv_text([], PREDICTION_COLUMNS)
    for row in rows:
        counts["error" if row["error"] else "ood" if row.get("is_ood") else "id"] += 1
        if fmt == "jsonl":
            yield json.dumps(row) + "\n"
        else:
            safe = {k: spreadsheet_safe(v) for k, v in row.items()}
            yield csv_text([safe], PREDICTION_COLUMNS, quoting=csv.QUOTE_NONNUMERIC).split("\n", 1)[1]


def write_predictions(out: str | os.PathLike | None, rows: Iterable[dict[str, Any]], *, fmt: str | None = None,
                      overwrite: bool = False) -> Counter[str]:
    """Stream ``rows`` to ``out`` (atomically; stdout when None) as CSV or JSON Lines; returns the tallies of
    :func:`prediction_lines`."""
    counts: Counter[str] = Counter()
    lines = prediction_lines(rows, prediction_format(out, fmt), counts)
    if out is None:
        for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
    else:
        write_atomic(out, lambda fh: fh.writelines(line.encode("utf-8") for line in lines), overwrite=overwrite)
    return counts


def evaluation_plot_paths(prefix: str | os.PathLike, scores: Sequence[str], ood: Sequence[str] = ()) -> list[Path]:
    """PREFIX-SCORE-hist.png and PREFIX-SCORE-roc.png for each score, and PREFIX-SCORE-maps-SET.png for each
    anomaly set ``ood`` (segmentation)."""
    base = Path(prefix)
    return [*(base.with_name(f"{base.name}-{s}-{kind}.png") for s in scores for kind in ("hist", "roc")),
            *(base.with_name(f"{base.name}-{s}-maps-{short_name(d).replace(':', '-')}.png") for s in scores
              for d in ood)]


def _sample_note(report: EvalReport, score: str) -> tuple[dict[str, float], str]:
    """(the table's AUROC per OOD set, a note when the plotted values are a sample of what the table counts)."""
    rows = [r for r in report.rows if r["score"] == score]
    aurocs = {str(r["dataset"]): float(r["auroc"]) for r in rows}
    by_set = report.scores[score]
    sampled = any("anomaly_pixels" in r or "n_ood" not in r or r["n_ood"] != len(by_set[str(r["dataset"])])
                  for r in rows)  # pixel rows count frames and plot a pixel sample
    if not sampled:
        return aurocs, ""
    sizes = ", ".join(f"{short_name(d)} {len(v):,}" for d, v in by_set.items() if d != "id")
    return aurocs, (f"curves from a sample (sampled, n = ID {len(by_set['id']):,}, {sizes}); AUROC in the legend "
                    "over all pixels, as in the table")


def write_evaluation_plots(prefix: str | os.PathLike, report: EvalReport, *, title: str = "",
                           log_fpr: bool = False) -> list[Path]:
    """For each score of ``report``: histograms of the score on ID vs each OOD set and ROC curves per OOD set
    (``log_fpr``: log FPR axis). The legends give the table's AUROC; curves drawn from a sample (segmentation
    pixels) say so, with its size. Returns the paths (:func:`evaluation_plot_paths`)."""
    paths = evaluation_plot_paths(prefix, list(report.scores))
    for i, (score, by_set) in enumerate(report.scores.items()):
        ood = {name: values for name, values in by_set.items() if name != "id"}
        aurocs, note = _sample_note(report, score)
        plot_score_histograms(paths[2 * i], by_set["id"], ood, score=score, title=title, aurocs=aurocs, note=note)
        curves = {(score, name): roc_curve(by_set["id"], values) for name, values in ood.items()}
        plot_roc_curves(paths[2 * i + 1], curves, title=f"ROC per OOD set: {score} {title}".strip(), log_fpr=log_fpr,
                        aurocs={(score, name): a for name, a in aurocs.items()}, note=note)
    return paths
