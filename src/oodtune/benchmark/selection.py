"""Choosing a fine-tuning setting on a validation grid: the ``[selection]`` section of a benchmark config.

A validation grid (``id_split = "val"``; its OOD set built from held-out data, never an OOD test set) has one
fine-tuned row per candidate setting (learning rate, trained part, pasting mode, ...) and names the row that holds
the paper's setting ``default``. **Rule** (:data:`RULE`): among the finished fine-tuned rows whose ID metric (mIoU,
or accuracy) stays within ``id_tolerance`` points of the pretrained model's, the one with the highest validation
``metric`` on ``dataset`` is the candidate; the default is kept unless the candidate's gain over it exceeds the
standard error of that gain, or the default itself falls outside the tolerance (then the candidate replaces it;
when no row is inside it, the default is kept and the table says so). The SE is a paired bootstrap over the
validation frames of the two rows' stored pixel samples (:func:`oodtune.metrics.bootstrap.clustered_gain_se`; a
classification row's ID and OOD images are resampled within each set, as the score selection does). Each row is
measured at the first of ``seeds`` on the first of its score-map variants (plain before blurred), so the SE covers
the validation frames, not fine-tuning seeds.

Writes ``OUT/selection.json`` and ``OUT/selection.md``; rows still pending are listed, and no row is chosen before
the default has finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metrics.bootstrap import clustered_gain_se
from ..report import markdown_table, provenance, write_json, write_text_atomic
from ..scores.selection import gain_standard_error
from .config import BenchmarkConfig
from .store import StoredEvaluation
from .tables import ID_METRICS

__all__ = ["ID_METRIC", "RULE", "Candidate", "candidate", "choose", "write_selection"]

RULE = ("among the rows whose ID metric stays within the tolerance of the pretrained model's, the highest validation "
        "metric is the candidate; the paper's default row is kept unless the candidate's gain exceeds its standard "
        "error (paired bootstrap over the validation frames, 200 replicates) or the default itself falls outside the "
        "tolerance (then the candidate replaces it; with no row inside it, the default is kept)")
#: The ID metric a row's eligibility is measured by, per task.
ID_METRIC = {"segmentation": "miou", "classification": "accuracy"}


@dataclass(frozen=True)
class Candidate:
    """One finished row of the grid: its validation scores (ID samples, OOD samples), their frame counts (None:
    one sample per cluster), its validation metric and its ID metric."""

    label: str
    scores: tuple[np.ndarray, np.ndarray]
    frames: tuple[list[int], list[int]] | None
    value: float
    id_value: float | None


def candidate(label: str, ev: StoredEvaluation, score: str, dataset: str, metric: str, id_metric: str) -> Candidate:
    """The :class:`Candidate` of a stored evaluation (``score`` on ``dataset``): a segmentation row's pixel samples
    with their frames, else the per-image scores."""
    px = ev.pixel_samples(score, dataset)
    scores = (ev.scores[score]["id"], ev.scores[score][dataset]) if px is None else px[:2]
    return Candidate(label, scores, None if px is None else px[2], float(ev.rows[score][dataset][metric]),
                     ev.id_metrics.get(id_metric))


def _gain_se(best: Candidate, default: Candidate, metric: str) -> float | None:
    """SE of ``best`` - ``default`` (points): over frames for pixel samples, over images (the score selection's
    :func:`~oodtune.scores.selection.gain_standard_error`) for per-image scores; None when the two cannot be paired
    (one stored without its frames, other frames, or other samples)."""
    try:
        if best.frames is None and default.frames is None:
            return gain_standard_error(best.scores, default.scores, metric=metric)
        if best.frames is None or best.frames != default.frames:
            return None
        return clustered_gain_se(best.scores, default.scores, *best.frames, metric=metric)
    except ConfigError:
        return None


def choose(rows: Mapping[str, Candidate], default: str, metric: str, *, pretrained_id: float | None = None,
           id_tolerance: float | None = None) -> dict[str, Any]:
    """Apply :data:`RULE` to the finished ``rows`` (label -> :class:`Candidate`): the per-row table (value, gain
    over the default, eligibility), the candidate, its gain and SE, and the chosen label (None while the default
    is pending)."""
    def eligible(c: Candidate) -> bool:
        return (id_tolerance is None or pretrained_id is None or c.id_value is None
                or c.id_value >= pretrained_id - id_tolerance)

    base = rows.get(default)
    table = [{"row": c.label, "value": c.value, "gain": None if base is None else c.value - base.value,
              "id_value": c.id_value, "eligible": eligible(c), "default": c.label == default} for c in rows.values()]
    out: dict[str, Any] = {"rows": table, "candidate": None, "gain": None, "gain_se": None, "chosen": None,
                           "default_eligible": None}
    if base is None:
        return out
    pool = [c for c in rows.values() if eligible(c)]
    out["default_eligible"] = eligible(base)
    if not pool:  # nothing keeps the ID metric: the default stays, and the table says why
        out.update(candidate=default, chosen=default)
        return out
    best = max(pool, key=lambda c: (c.value, c.label == default))
    out["candidate"] = best.label
    if best.label == default:
        out["chosen"] = default
        return out
    se = _gain_se(best, base, metric)
    gain = best.value - base.value
    beats = se is not None and gain > se
    out.update(gain=gain, gain_se=se, chosen=best.label if beats or not eligible(base) else default)
    return out


def write_selection(cfg: BenchmarkConfig, rows: Mapping[str, Candidate], pretrained_id: float | None,
                    pending: list[str], command: str) -> list[Path]:
    """``OUT/selection.json`` and ``OUT/selection.md`` for ``cfg.selection`` (module docstring)."""
    spec = cfg.selection
    if spec is None:
        return []
    result = choose(rows, spec.default, spec.metric, pretrained_id=pretrained_id, id_tolerance=spec.id_tolerance)
    id_name = ID_METRIC[cfg.task]
    id_header = ID_METRICS[id_name]
    tolerance = spec.id_tolerance
    data = {"command": command, **provenance(), "selection": spec.to_dict(), "rule": RULE,
            "id_metric": id_name, "pretrained_id": pretrained_id, **result, "pending": pending}
    metric = "AUROC" if spec.metric == "auroc" else "AUPR-Out"
    lines = [f"# Selection: {cfg.name}", "", f"Command: `{command}`", "",
             f"Validation metric: {metric} (%) on `{spec.dataset}`; ID metric: {id_header} (%) on the ID "
             f"{cfg.id_split} split (pretrained model: {'–' if pretrained_id is None else f'{pretrained_id:.2f}'}); "
             f"tolerance: {'none' if tolerance is None else f'{tolerance:g} point' + ('' if tolerance == 1 else 's')}."
             f" Rule: {RULE}.", "",
             markdown_table([{**r, "row": r["row"] + (" (default)" if r["default"] else ""),
                              "eligible": "yes" if r["eligible"] else "no"} for r in result["rows"]],
                            ["row", "value", "gain", "id_value", "eligible"],
                            ["row", metric, f"gain over {spec.default}", id_header, "eligible"]), ""]
    if result["chosen"] is None:
        lines.append(f"**Pending**: the default row {spec.default!r} has not finished; nothing is chosen yet.")
    elif not any(r["eligible"] for r in result["rows"]):
        lines.append(f"**Chosen: {spec.default}**: no finished row keeps {id_header} within the tolerance; the "
                     "default is kept.")
    elif result["candidate"] == spec.default:
        lines.append(f"**Chosen: {spec.default}** (the default has the highest {metric} of the eligible rows).")
    else:
        se = result["gain_se"]
        se_text = "no SE (the two rows' samples cannot be paired)" if se is None else f"SE {se:.2f}"
        beats = se is not None and result["gain"] > se
        verdict = "the gain exceeds its SE" if beats else "the gain does not exceed its SE"
        if not result["default_eligible"]:
            verdict += f"; the default loses more than the tolerance in {id_header}, so the candidate replaces it"
        elif not beats:
            verdict += ": the default is kept"
        lines.append(f"**Chosen: {result['chosen']}**. Candidate {result['candidate']}: "
                     f"{result['gain']:+.2f} points over the default, {se_text}; {verdict}.")
    if pending:
        lines += ["", "Pending rows: " + "; ".join(pending) + "."]
    return [write_json(cfg.out / "selection.json", data, overwrite=True),
            write_text_atomic(cfg.out / "selection.md", "\n".join(lines) + "\n", overwrite=True)]
