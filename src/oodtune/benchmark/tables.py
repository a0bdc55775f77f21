"""The benchmark's summary: per-run records -> results.json, results.md and results.csv (per OOD set) (mean ±
sample std over seeds; ``n`` = images in the OOD set).

A *record* is what one evaluation of one checkpoint stored (``Benchmark.evaluate``): the ID-task metrics at the
top level (``accuracy``, long-tailed ``acc_*``), ``train_seconds`` (None for post-hoc rows), and ``rows`` with
one metrics dict per OOD set. "mean ± std" uses the sample std (ddof=1), as is usual for "over N runs"; a single
run is shown as its plain value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_csv
from ..evaluation import METRIC_KEYS
from ..metrics import LT_KEYS
from ..report import flat_rows, markdown_table, provenance, write_json, write_text_atomic
from .config import BenchmarkConfig

__all__ = ["ID_METRICS", "SET_METRICS", "mean_std", "summarize", "write_results"]

#: ID-task metrics a record may carry -> column header.
ID_METRICS = {"accuracy": "ID acc", "miou": "mIoU", "pixel_accuracy": "pixel acc"}
#: Secondary per-set metrics a row may carry (segmentation: SegmentMeIfYouCan components) -> column header.
SET_METRICS = {"siou": "sIoU↑", "ppv": "PPV↑", "mean_f1": "mean F1↑"}
METRIC_HEADERS = ["AUROC↑", "AUPR-In↑", "AUPR-Out↑", "FPR95↓"]


def mean_std(values: list[float | None]) -> tuple[float, float] | float | None:
    """(mean, sample std) over runs; a single run as its plain value; None when no run has a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    arr = np.asarray(present, dtype=float)
    return float(arr[0]) if len(arr) == 1 else (float(arr.mean()), float(arr.std(ddof=1)))


def summarize(results: dict[str, list[dict[str, Any]]], groups: dict[str, str]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows per method, averaged over all / near / far OOD sets; rows per method and OOD set)."""
    summary, per_set = [], []
    buckets = {"all": list(groups)} | {g: [n for n in groups if groups[n] == g] for g in ("near", "far")}
    for label, runs in results.items():
        row: dict[str, Any] = {"method": label, "runs": len(runs),
                               "train_seconds": mean_std([r.get("train_seconds") for r in runs])}
        for key in (*ID_METRICS, *LT_KEYS):
            if key in runs[0]:
                row[key] = mean_std([r[key] for r in runs])
        for bucket, names in buckets.items():
            for m in METRIC_KEYS:
                per_run = [float(np.mean([x[m] for x in r["rows"] if x["dataset"] in names])) for r in runs if names]
                if per_run:
                    row[f"{m}_{bucket}"] = mean_std(per_run)  # type: ignore[arg-type]
        summary.append(row)
        for name in groups:
            rows = [next(x for x in r["rows"] if x["dataset"] == name) for r in runs]
            keys = [*METRIC_KEYS, *(m for m in SET_METRICS if all(m in x for x in rows))]
            vals = {m: mean_std([x[m] for x in rows]) for m in keys}
            n = next((x.get("n_ood") for x in runs[0]["rows"] if x["dataset"] == name), None)
            per_set.append({"method": label, "dataset": name, "group": groups[name], **vals, "n": n})
    return summary, per_set


def write_results(cfg: BenchmarkConfig, results: dict[str, list[dict[str, Any]]], command: str,
                  missing: list[str]) -> list[Path]:
    """OUT/results.json and OUT/results.md for the finished runs; ``missing`` lists the runs not done yet."""
    summary, per_set = summarize(results, cfg.groups)
    data: dict[str, Any] = {"name": cfg.name, "command": command, **provenance(), "seeds": cfg.seeds, "arch": cfg.arch,
                            "id_dataset": cfg.id_dataset, "summary": summary, "per_set": per_set}
    if missing:
        data["missing"] = missing
    js = write_json(cfg.out / "results.json", data, overwrite=True)
    csv_path = write_csv(cfg.out / "results.csv", flat_rows(per_set), overwrite=True)
    md = [f"# {cfg.name}\n", f"Command: `{command}`\n",
          f"ID: {cfg.id_dataset}, {cfg.arch}; seeds {cfg.seeds}. Fine-tuned rows: mean ± sample "
          "std over `runs` seeds; post-hoc rows score the single pretrained model. Metrics in %; `fine-tune s` "
          "is training wall time, torch.compile warm-up included where used."
          + ("" if cfg.id_split == "test" else f" ID metrics on the {cfg.id_split} split.") + "\n",
          f"\noodtune {data['oodtune_version']}; positive class {data['metric_convention']['positive_class']}: "
          f"{data['metric_convention']['fpr_rule']}; n = images per OOD set.\n"]
    id_cols = [k for k in ID_METRICS if summary and k in summary[0]]
    for bucket in ("all", "near", "far"):
        cols = ["method", "runs", *id_cols, *[f"{m}_{bucket}" for m in METRIC_KEYS], "train_seconds"]
        if summary and any(c in summary[0] for c in cols[2 + len(id_cols):-1]):
            md.append(f"\n## Average over {bucket} OOD sets\n\n")
            md.append(markdown_table(summary, cols, ["method", "runs", *[ID_METRICS[k] for k in id_cols],
                                                     *METRIC_HEADERS, "fine-tune s"]))
    if summary and "acc_head" in summary[0]:
        md.append("\n## Long-tailed ID accuracy (head / medium / tail), plain and with logit adjustment (τ=1)\n\n")
        md.append(markdown_table(summary, ["method", *LT_KEYS]))
    md.append("\n## Per OOD set\n\n")
    md.append(markdown_table(per_set, ["method", "dataset", "group", *METRIC_KEYS, "n"]))
    set_cols = [m for m in SET_METRICS if per_set and all(m in r for r in per_set)]
    if set_cols:
        md.append("\n## Component-level metrics per OOD set (SegmentMeIfYouCan; threshold of best pixel F1)\n\n")
        md.append(markdown_table(per_set, ["method", "dataset", *set_cols],
                                 ["method", "dataset", *[SET_METRICS[m] for m in set_cols]]))
    if missing:
        md.append("\n## Not run yet\n\n" + "".join(f"- {m}\n" for m in missing))
    return [js, write_text_atomic(cfg.out / "results.md", "".join(md), overwrite=True), csv_path]
