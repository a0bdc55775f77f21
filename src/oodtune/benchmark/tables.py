"""The benchmark's summary: per-run records -> results.json, results.md and results.csv (per OOD set) (mean ±
sample std over seeds, and every seed on its own; ``n`` = images in the OOD set).

A *record* is one evaluated checkpoint (:meth:`.grid.Benchmark.record`): ``seed`` (None for post-hoc rows),
``checkpoint_sha256``, the ID-task metrics at the top level (``accuracy``, long-tailed ``acc_*``),
``train_seconds`` (None for post-hoc rows, shown as "–"), ``history`` (per-epoch training losses) and ``rows``
with one metrics dict per OOD set, FPR95 under both conventions (:data:`oodtune.metrics.DETECTION_KEYS`; pixel-wise
rows also carry the SegmentMeIfYouCan components).
"mean ± std" uses the sample std (ddof=1), as is usual for "over N runs"; a single run is shown as its plain
value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import DETECTION_KEYS, LT_KEYS
from ..report import flat_rows, markdown_table, provenance, write_json, write_text_atomic
from ..utils.atomic import write_csv
from .config import BenchmarkConfig

__all__ = ["CONVENTIONS", "ID_METRICS", "PIXEL_CONVENTIONS", "SET_METRICS", "conventions", "mean_std", "per_seed",
           "summarize", "write_results"]

#: ID-task metrics a record may carry -> column header.
ID_METRICS = {"accuracy": "ID acc", "miou": "mIoU (argmax all outputs)", "miou_classes": "mIoU (argmax classes)",
              "pixel_accuracy": "pixel acc"}
#: Secondary per-set metrics a row may carry (segmentation: SegmentMeIfYouCan components) -> column header.
SET_METRICS = {"siou": "sIoU↑", "ppv": "PPV↑", "mean_f1": "mean F1↑"}
METRIC_HEADERS = dict(zip(DETECTION_KEYS, ["AUROC↑", "AUPR-In↑", "AUPR-Out↑", "FPR95↓ OOD+", "FPR95↓ ID+"],
                          strict=True))
CONVENTIONS = (
    "Metrics in %. **FPR95 OOD+**: OOD is the positive class, as in the Outlier Exposure and Balanced Energy "
    "code and tables — the % of ID test images flagged as OOD at the threshold that flags 95% of the OOD images. "
    "**FPR95 ID+**: ID is the positive class, as in the energy_ood code (its default) and OpenOOD — the % of OOD "
    "images accepted as ID at the threshold that accepts 95% of the ID images. AUROC is the same under both; "
    "AUPR-In / AUPR-Out take ID / OOD as the positive class (the papers' single \"AUPR\" is AUPR-Out). Both FPR95s "
    "take the first operating point reaching 95% TPR (`oodtune.metrics`)."
)


#: The same conventions for pixel-wise (segmentation) rows, whose samples are pixels of the anomaly sets' frames.
PIXEL_CONVENTIONS = (
    "Metrics in %, over the non-void pixels of each anomaly set's frames (ID = inlier pixels, OOD = anomaly "
    "pixels). **FPR95 OOD+**: anomaly pixels are the positive class, as in the PEBAL and Balanced Energy code — "
    "the % of inlier pixels flagged at the threshold that flags 95% of the anomaly pixels. **FPR95 ID+**: inlier "
    "pixels positive — the % of anomaly pixels accepted at the threshold that accepts 95% of the inlier pixels. "
    "AUROC is the same under both; AUPR-Out (the papers' AP) takes the anomaly pixels as positive, AUPR-In the "
    "inlier pixels. Both FPR95s take the first operating point reaching 95% TPR (`oodtune.metrics`)."
)


def conventions(cfg: BenchmarkConfig) -> str:
    """The metric conventions a table of ``cfg`` states in its header."""
    return PIXEL_CONVENTIONS if cfg.task == "segmentation" else CONVENTIONS


def mean_std(values: list[float | None]) -> tuple[float, float] | float | None:
    """(mean, sample std) over runs; a single run as its plain value; None when no run has a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    arr = np.asarray(present, dtype=float)
    return float(arr[0]) if len(arr) == 1 else (float(arr.mean()), float(arr.std(ddof=1)))


def _buckets(groups: dict[str, str]) -> dict[str, list[str]]:
    return {"all": list(groups)} | {g: [n for n in groups if groups[n] == g] for g in ("near", "far")}


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    """The detection metrics every row has (pixel-wise rows have no ``fpr95_in``)."""
    return [m for m in DETECTION_KEYS if all(m in x for x in rows)]


def _averages(record: dict[str, Any], groups: dict[str, str]) -> dict[str, float]:
    """``<metric>_<all|near|far>``: the record's metrics averaged over each group of OOD sets."""
    out = {}
    for bucket, names in _buckets(groups).items():
        for m in _keys(record["rows"]):
            values = [x[m] for x in record["rows"] if x["dataset"] in names]
            if values:
                out[f"{m}_{bucket}"] = float(np.mean(values))
    return out


def summarize(results: dict[str, list[dict[str, Any]]], groups: dict[str, str]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows per method, averaged over all / near / far OOD sets; rows per method and OOD set)."""
    summary, per_set = [], []
    for label, runs in results.items():
        row: dict[str, Any] = {"method": label, "runs": len(runs),
                               "train_seconds": mean_std([r.get("train_seconds") for r in runs])}
        for key in (*ID_METRICS, *LT_KEYS):
            if key in runs[0]:
                row[key] = mean_std([r.get(key) for r in runs])
        averaged = [_averages(r, groups) for r in runs]
        for key in averaged[0]:
            row[key] = mean_std([a[key] for a in averaged])
        summary.append(row)
        for name in groups:
            rows = [next(x for x in r["rows"] if x["dataset"] == name) for r in runs]
            keys = [*_keys(rows), *(m for m in SET_METRICS if all(m in x for x in rows))]
            vals = {m: mean_std([x[m] for x in rows]) for m in keys}
            per_set.append({"method": label, "dataset": name, "group": groups[name], **vals, "n": rows[0].get("n_ood")})
    return summary, per_set


def per_seed(results: dict[str, list[dict[str, Any]]], groups: dict[str, str]) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint: method, seed, checkpoint hash, ID metrics, time, group averages, the
    metrics on every OOD set (``rows``) and the training history (per-epoch losses; None for post-hoc rows)."""
    out = []
    for label, runs in results.items():
        for r in runs:
            ids = {k: r[k] for k in (*ID_METRICS, *LT_KEYS) if k in r}
            out.append({"method": label, "seed": r["seed"], "checkpoint_sha256": r["checkpoint_sha256"][:16],
                        "score": r["score"], **ids, "train_seconds": r["train_seconds"], **_averages(r, groups),
                        "rows": r["rows"], "history": r.get("history")})
    return out


def write_results(cfg: BenchmarkConfig, results: dict[str, list[dict[str, Any]]], command: str,
                  missing: list[str]) -> list[Path]:
    """OUT/results.json and OUT/results.md for the finished runs; ``missing`` lists the runs not done yet."""
    summary, per_set = summarize(results, cfg.groups)
    seeds = per_seed(results, cfg.groups)
    data: dict[str, Any] = {"name": cfg.name, "command": command, **provenance(), "seeds": cfg.seeds, "arch": cfg.arch,
                            "id_dataset": cfg.id_dataset, "conventions": conventions(cfg), "summary": summary,
                            "per_set": per_set, "per_seed": seeds}
    if missing:
        data["missing"] = missing
    js = write_json(cfg.out / "results.json", data, overwrite=True)
    csv_path = write_csv(cfg.out / "results.csv", flat_rows(per_set), overwrite=True)
    md = [f"# {cfg.name}\n\n", f"Command: `{command}`\n\n",
          f"ID: {cfg.id_dataset}, {cfg.arch}; seeds {cfg.seeds}. Fine-tuned rows: mean ± sample std over `runs` "
          "seeds (each seed on its own under \"Per seed\"); post-hoc rows score the single pretrained model. "
          f"{conventions(cfg)} `fine-tune s` is training wall time, torch.compile warm-up included where used; "
          "\"–\" for post-hoc rows, which train nothing."
          + ("" if cfg.id_split == "test" else f" ID metrics on the {cfg.id_split} split.")
          + f" oodtune {data['oodtune_version']}; n = "
          + ("frames" if cfg.task == "segmentation" else "images") + " per OOD set.\n"]
    id_cols = [k for k in ID_METRICS if summary and k in summary[0]]
    id_headers = [ID_METRICS[k] for k in id_cols]
    for bucket in ("all", "near", "far"):
        keys = [m for m in DETECTION_KEYS if summary and f"{m}_{bucket}" in summary[0]]
        if keys:
            md.append(f"\n## Average over {bucket} OOD sets\n\n")
            md.append(markdown_table(summary, ["method", "runs", *id_cols, *[f"{m}_{bucket}" for m in keys],
                                              "train_seconds"],
                                     ["method", "runs", *id_headers, *[METRIC_HEADERS[m] for m in keys],
                                      "fine-tune s"]))
    if summary and "acc_head" in summary[0]:
        md.append("\n## Long-tailed ID accuracy (head / medium / tail), plain and with logit adjustment (τ=1)\n\n")
        md.append(markdown_table(summary, ["method", *LT_KEYS]))
    md.append("\n## Per OOD set\n\n")
    keys = [m for m in DETECTION_KEYS if per_set and all(m in r for r in per_set)]
    md.append(markdown_table(per_set, ["method", "dataset", "group", *keys, "n"],
                             ["method", "dataset", "group", *[METRIC_HEADERS[m] for m in keys], "n"]))
    set_cols = [m for m in SET_METRICS if per_set and all(m in r for r in per_set)]
    if set_cols:
        md.append("\n## Component-level metrics per OOD set (SegmentMeIfYouCan; threshold of best pixel F1)\n\n")
        md.append(markdown_table(per_set, ["method", "dataset", *set_cols],
                                 ["method", "dataset", *[SET_METRICS[m] for m in set_cols]]))
    if seeds:
        keys = [m for m in DETECTION_KEYS if all(f"{m}_all" in r for r in seeds)]
        md.append("\n## Per seed (average over all OOD sets)\n\n")
        md.append(markdown_table(seeds, ["method", "seed", *id_cols, *[f"{m}_all" for m in keys],
                                         "train_seconds", "checkpoint_sha256"],
                                 ["method", "seed", *id_headers, *[METRIC_HEADERS[m] for m in keys], "fine-tune s",
                                  "checkpoint"]))
    if missing:
        md.append("\n## Not run yet\n\n" + "".join(f"- {m}\n" for m in missing))
    return [js, write_text_atomic(cfg.out / "results.md", "".join(md), overwrite=True), csv_path]
