"""The score × model matrix: every post-hoc score of ``[matrix].scores`` on the pretrained model *and* on every
fine-tuned run of the benchmark, one table per metric (rows: models, columns: scores; mean ± sample std over
seeds of the average over the OOD sets).

Each model is evaluated by one :func:`oodtune.pipeline.evaluate_checkpoint` call: one forward pass per dataset
computes the logits and features that every score reads (ODIN alone re-runs the network for its input
gradients). In ``selected`` mode the scores' hyperparameters are first chosen on the validation pair (held-out ID
train images vs held-out auxiliary outliers, :mod:`oodtune.scores.selection`); the ``default`` mode (the papers'
values) comes from the same call (``EvalReport.default_rows``). Each model's record is stored under
``OUT/matrix/`` in a file named by a hash of everything it depends on (checkpoint path, scores, validation pair,
OOD sets), so a finished record is reused only for the same question and a changed ``[matrix]`` never silently
reuses an old one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import pipeline
from ..errors import ConfigError
from ..evaluation.classification import METRIC_KEYS
from ..report import METRIC_LABELS, fmt, markdown_table, write_json, write_text_atomic
from .config import BenchmarkConfig, MatrixSpec
from .tables import mean_std

__all__ = ["MatrixModel", "matrix_record", "run_matrix", "summarize_matrix", "write_matrix"]

PRETRAINED = "Pretrained (no fine-tuning)"
LOWER_IS_BETTER = {"fpr95"}


@dataclass(frozen=True)
class MatrixModel:
    """One row-run of the matrix: a checkpoint, the table row it belongs to, and its seed (None: pretrained)."""

    label: str
    checkpoint: Path
    seed: int | None = None

    @property
    def key(self) -> str:
        return "pretrained" if self.seed is None else f"{Path(self.checkpoint).parent.name}"


def _spec(cfg: BenchmarkConfig) -> MatrixSpec:
    if cfg.matrix is None:
        raise ConfigError(f"{cfg.name}: the benchmark config has no [matrix] section.")
    return cfg.matrix


def _record_path(cfg: BenchmarkConfig, model: MatrixModel) -> Path:
    spec = _spec(cfg)
    question: dict[str, Any] = {"checkpoint": str(model.checkpoint), "scores": list(spec.scores),
                                "ood": cfg.ood_near + cfg.ood_far, "num_ood": cfg.num_ood}
    if cfg.id_split != "test":  # the ID accuracy column comes from another split
        question["id_split"] = cfg.id_split
    if "selected" in spec.modes:
        question["validation"] = {"outliers": spec.validation_outliers, "num_outliers": spec.num_validation_outliers,
                                  "id_holdout": spec.id_holdout}
    digest = hashlib.sha256(json.dumps(question, sort_keys=True).encode()).hexdigest()[:10]
    return cfg.out / "matrix" / f"{model.key}-{digest}.json"


def matrix_record(cfg: BenchmarkConfig, source: pipeline.DataSource, model: MatrixModel) -> dict[str, Any]:
    """Evaluate ``model`` with every matrix score (or read the stored record of that exact question)."""
    spec = _spec(cfg)
    path = _record_path(cfg, model)
    if path.exists():
        return dict(json.loads(path.read_text()))
    validation = None
    if "selected" in spec.modes:
        if spec.validation_outliers is None:
            raise ConfigError(f"{cfg.name}: selected hyperparameters need [matrix].validation_outliers.")
        validation = pipeline.ValidationSpec(outliers=spec.validation_outliers, id_holdout=spec.id_holdout,
                                             num_outliers=spec.num_validation_outliers)
    report, _ = pipeline.evaluate_checkpoint(model.checkpoint, scores=list(spec.scores),
                                             ood=cfg.ood_near + cfg.ood_far, data_root=source, device=cfg.device,
                                             num_ood=cfg.num_ood, id_split=cfg.id_split, validation=validation)
    record = {"model": model.label, "seed": model.seed, "checkpoint": str(model.checkpoint),
              "selected": validation is not None, "matrix": spec.to_dict(), **report.id_metrics,
              "eval_seconds": report.seconds, "rows": report.rows, "default_rows": report.default_rows,
              "selections": report.selections}
    write_json(path, record)
    return record


def run_matrix(cfg: BenchmarkConfig, source: pipeline.DataSource, models: list[MatrixModel], command: str, *,
               tabulate_only: set[MatrixModel] | frozenset[MatrixModel] = frozenset()) -> list[Path]:
    """Evaluate every model not stored yet — except ``tabulate_only`` models, which are only read — and write
    OUT/matrix.json + OUT/matrix.md."""
    records: list[dict[str, Any]] = []
    missing: list[str] = []
    for model in models:
        if model in tabulate_only and not _record_path(cfg, model).exists():
            missing.append(model.label + ("" if model.seed is None else f" seed {model.seed}"))
            continue
        records.append(matrix_record(cfg, source, model))
    return write_matrix(cfg, records, command, missing)


def _rows(record: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """A record's rows in hyperparameter ``mode`` (the default rows of a selecting record are its ``default_rows``)."""
    return list(record["default_rows"] if mode == "default" and record["selected"] else record["rows"])


def _average(rows: list[dict[str, Any]], score: str, metric: str, sets: list[str]) -> float:
    return float(np.mean([r[metric] for r in rows if r["score"] == score and r["dataset"] in sets]))


def summarize_matrix(cfg: BenchmarkConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """mode -> bucket (all/near/far) -> metric -> model -> score -> mean ± std over seeds (tables.mean_std)."""
    spec = _spec(cfg)
    buckets = {"all": cfg.ood_near + cfg.ood_far, "near": cfg.ood_near, "far": cfg.ood_far}
    out: dict[str, Any] = {}
    labels = list(dict.fromkeys(r["model"] for r in records))
    for mode in spec.modes:
        out[mode] = {bucket: {metric: {label: {score: mean_std([_average(_rows(r, mode), score, metric, sets)
                                                                 for r in records if r["model"] == label])
                                               for score in spec.scores}
                                       for label in labels}
                              for metric in METRIC_KEYS}
                     for bucket, sets in buckets.items() if sets}
        out[mode]["runs"] = {label: sum(r["model"] == label for r in records) for label in labels}
        out[mode]["accuracy"] = {label: mean_std([r["accuracy"] for r in records if r["model"] == label])
                                 for label in labels}
    return out


def _row(label: str, cells: dict[str, Any], metric: str, runs: int, accuracy: Any) -> dict[str, str]:
    """One table row; the best score of the row in bold."""
    means = {s: m for s, m in ((s, _mean(v)) for s, v in cells.items()) if m is not None}
    best = (min if metric in LOWER_IS_BETTER else max)(means, key=lambda s: means[s]) if means else None
    return {"model": label, "runs": str(runs), "acc": fmt(accuracy),
            **{s: f"**{fmt(v)}**" if s == best else fmt(v) for s, v in cells.items()}}


def _mean(value: Any) -> float | None:
    return None if value is None else float(value[0] if isinstance(value, (tuple, list)) else value)


def _difference_rows(table: dict[str, dict[str, Any]], against: str) -> list[dict[str, str]]:
    """Per model, each score's mean minus the mean of ``against``: a model label (same score on that model) or a
    score name (that score on the same model)."""
    rows = []
    for label, cells in table.items():
        if label == against:
            continue
        diffs = {}
        for score, value in cells.items():
            base = table[against][score] if against in table else cells.get(against)
            a, b = _mean(value), _mean(base)
            diffs[score] = "–" if a is None or b is None else f"{a - b:+.2f}"
        rows.append({"model": label, **diffs})
    return rows


def _selection_rows(records: list[dict[str, Any]], scores: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    for r in records:
        cells = {s: ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r["selections"][s]["chosen"].items()) or "–"
                 for s in scores if s in r["selections"]}
        rows.append({"model": r["model"], "seed": "–" if r["seed"] is None else str(r["seed"]), **cells})
    return rows


def write_matrix(cfg: BenchmarkConfig, records: list[dict[str, Any]], command: str, missing: list[str]) -> list[Path]:
    """OUT/matrix.json (summary, selections, the records' rows) and OUT/matrix.md (one table per metric)."""
    spec = _spec(cfg)
    summary = summarize_matrix(cfg, records)
    data: dict[str, Any] = {"name": cfg.name, "command": command, "matrix": spec.to_dict(), "seeds": cfg.seeds,
                            "summary": summary, "records": records}
    if missing:
        data["missing"] = missing
    js = write_json(cfg.out / "matrix.json", data, overwrite=True)
    scores = list(spec.scores)
    md = [f"# Score × model matrix: {cfg.name}\n\n", f"Command: `{command}`\n\n",
          f"ID: {cfg.id_dataset}, {cfg.arch}; seeds {cfg.seeds}. Each cell: the score's metric averaged over the OOD "
          "sets of the heading, mean ± sample std over the fine-tuning seeds (the pretrained model is one run); "
          "the best score of each row in bold. Metrics in %, scores \"higher = more in-distribution\".\n"]
    titles = {"selected": f"Hyperparameters selected on the validation pair (held-out ID train images × "
                          f"{spec.validation_outliers})",
              "default": "Paper-default hyperparameters"}
    for mode in spec.modes:
        mode_summary = summary[mode]
        md.append(f"\n## {titles[mode]}\n")
        for bucket, metrics in [("all", METRIC_KEYS), ("near", ("auroc", "fpr95")), ("far", ("auroc", "fpr95"))]:
            if bucket not in mode_summary:
                continue
            for metric in metrics:
                table = mode_summary[bucket][metric]
                rows = [_row(label, table[label], metric, mode_summary["runs"][label], mode_summary["accuracy"][label])
                        for label in table]
                md.append(f"\n### {METRIC_LABELS[metric]}, average over {bucket} OOD sets\n\n")
                md.append(markdown_table(rows, ["model", "runs", "acc", *scores], ["model", "runs", "ID acc", *scores]))
        for metric in ("auroc", "fpr95"):
            table = mode_summary["all"][metric]
            if PRETRAINED in table and len(table) > 1:
                md.append(f"\n### {METRIC_LABELS[metric]} change from the pretrained model (same score), all OOD "
                          "sets\n\n" + markdown_table(_difference_rows(table, PRETRAINED), ["model", *scores]))
            if "energy" in scores:
                md.append(f"\n### {METRIC_LABELS[metric]} of each score minus energy's on the same model, all OOD "
                          "sets\n\n" + markdown_table(_difference_rows(table, "energy"), ["model", *scores]))
        if mode == "selected":
            tuned = [s for s in scores if any(r["selections"][s]["tried"] for r in records)]
            md.append("\n### Chosen hyperparameters\n\n" + (
                markdown_table(_selection_rows(records, tuple(tuned)), ["model", "seed", *tuned])
                if tuned else "(no selected records yet)\n"))
    if missing:
        md.append("\n## Not run yet\n\n" + "".join(f"- {m}\n" for m in missing))
    return [js, write_text_atomic(cfg.out / "matrix.md", "".join(md), overwrite=True)]
