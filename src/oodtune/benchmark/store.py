"""What the benchmark computes from a checkpoint, cached under keys made of its inputs.

A cached value is found again only when every input that determines it is the same, so adding an OOD set, a
score or a row to a finished benchmark computes exactly what is missing, and a changed input can never be
answered from a stale file:

* the **checkpoint** is identified by the SHA-256 of its file (not by its path);
* a **score** by its name and its options (:meth:`oodtune.scores.Score.params`, as the checkpoint's task builds
  it — e.g. ODIN's temperature, ε and the normalisation std its step is divided by);
* a **dataset** by its name and size (``num_ood``; ``all`` for the whole set); the ID split the ID metrics and
  ID scores come from (``test``, or ``val`` when the benchmark must not look at the test split) by its name.

Layout (``OUT/evals``)::

    <checkpoint sha256[:16]>[-bf16]/        (-bf16: the forward passes ran in bf16 autocast, which scores differently)
        checkpoint.json                      sha256, ID-task metrics (accuracy, long-tailed ...) on the ID test
                                             split (``checkpoint-val.json``: on the validation split)
        <name>.json                          other derived values, e.g. the outlier prior and margins
        <score>-<options hash>/options.json  the score's options, for the reader
        <score>-<options hash>/<set>.json    the metrics row the checkpoint's task computed for the set against
                                             the ID test split (``<set>-val.json``: the validation split; exact;
                                             both FPR95 conventions for classification, pixel metrics and
                                             components for segmentation)
        <score>-<options hash>/<set>.npy     raw per-sample scores (float32, higher = more ID; for segmentation
                                             a seeded sample of the set's anomaly-pixel scores, its row's
                                             ``sample_frames`` giving the sampled pixels per frame, and
                                             ``<set>-inliers.npy`` the sample of its inlier pixels; blurred
                                             maps: ``<set>-blur.npy``, ``<set>-blur-inliers.npy``); ``id.npy``
                                             (``id-val.npy``, ``id-blur.npy``) for the ID split

Files are written atomically and never replaced; a file that another process wrote first (two ``--only``
processes evaluating one checkpoint at once) holds the same value and is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..evaluation.classification import EvalReport
from ..report import write_json
from ..scores import Score
from ..utils.atomic import file_sha256, write_atomic

__all__ = ["EvalStore", "StoredEvaluation", "dataset_key", "score_key"]

log = logging.getLogger(__name__)

ID = "id"  # the key of the ID test split among the datasets of an evaluation


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def score_options(score: Score) -> dict[str, Any]:
    """The settings ``score`` was built with (:meth:`oodtune.scores.Score.params`, tensors as lists)."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in score.params().items()}


def score_key(score: Score) -> str:
    """``<name>-<hash of its options>``: two scores share cached values only if name and options agree."""
    return f"{score.name}-{_short_hash(score_options(score))}"


def dataset_key(name: str, num: int | None) -> str:
    """``<name>-n<size>`` (``-nall`` for the whole set); names holding a path (``folder:PATH``) are slugged and
    hashed."""
    base = _slug(name) if re.fullmatch(r"[a-z0-9-]+", name) else f"{_slug(name)[-40:]}-{_short_hash(name)}"
    return f"{base}-n{'all' if num is None else num}"


@dataclass
class StoredEvaluation:
    """ID-task metrics, metrics rows (``rows[score name][OOD set]``) and raw scores (``scores[score name][dataset
    name or "id"]``) of one checkpoint."""

    sha256: str
    id_metrics: dict[str, float] = field(default_factory=dict)
    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: segmentation: ``sample_frames[score name][OOD set]`` = {"in": [...], "out": [...]}, the sampled inlier /
    #: anomaly pixels per frame (:mod:`oodtune.evaluation.segmentation`); absent for evaluations stored before it
    sample_frames: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)
    #: segmentation: ``inliers[score name][OOD set]``, the sample of that set's inlier-pixel scores (in frame order,
    #: paired with ``sample_frames``' "in" counts); absent for evaluations stored before it
    inliers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def pixel_samples(self, score: str, dataset: str
                      ) -> tuple[np.ndarray, np.ndarray, tuple[list[int], list[int]]] | None:
        """Segmentation: (the inlier-pixel sample, the anomaly-pixel sample, (inlier, anomaly) sampled pixels per
        frame) of ``score`` on the anomaly set ``dataset``; None when the evaluation was stored without them."""
        frames, inliers = self.sample_frames.get(score, {}).get(dataset), self.inliers.get(score, {}).get(dataset)
        if frames is None or inliers is None:
            return None
        return inliers, self.scores[score][dataset], (list(frames["in"]), list(frames["out"]))


#: Computes an evaluation of the checkpoint for (score names, OOD set names).
Compute = Callable[[list[str], list[str]], EvalReport]


class EvalStore:
    """The cache under ``root`` (module docstring); checkpoints are named by the SHA-256 of their file."""

    def __init__(self, root: str | Path, *, id_split: str = "test", precision: str = "fp32", blur: bool = False
                 ) -> None:
        self.root = Path(root)
        self.suffix = "" if precision == "fp32" else f"-{precision}"  # bf16 forward passes score differently
        # blurred score maps (segmentation) are stored beside the plain ones: <set>-blur.npy, id-blur.npy, ...
        suffix = ("" if id_split == "test" else f"-{id_split}") + ("-blur" if blur else "")
        self.id_file, self.info_file, self.row_suffix = f"{ID}{suffix}", f"checkpoint{suffix}.json", f"{suffix}.json"
        self.set_suffix = "-blur" if blur else ""  # an OOD set's scores depend on the blur, not on the ID split
        self._sha: dict[tuple[str, int, int], str] = {}

    def sha256(self, checkpoint: str | Path) -> str:
        """SHA-256 of a checkpoint file (memoised per path, size and modification time)."""
        path = Path(checkpoint).resolve()
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._sha:
            self._sha[key] = file_sha256(path)
        return self._sha[key]

    def folder(self, sha256: str) -> Path:
        return self.root / f"{sha256[:16]}{self.suffix}"

    def row_path(self, scores_path: Path) -> Path:
        """Beside an OOD set's ``.npy`` scores: its metrics row against the ID split (``<set>.json``;
        ``<set>-val.json`` against the validation split; ``<set>-blur.json`` of blurred maps)."""
        return scores_path.with_name(scores_path.stem.removesuffix(self.set_suffix) + self.row_suffix)

    @staticmethod
    def inliers_path(scores_path: Path) -> Path:
        """Beside a segmentation anomaly set's ``.npy`` scores: the sample of its inlier pixels."""
        return scores_path.with_name(scores_path.stem + "-inliers.npy")

    def derived(self, sha256: str, name: str, compute: Callable[[], dict[str, Any]] | None) -> dict[str, Any] | None:
        """A JSON value derived from the checkpoint ``sha256`` alone (``name`` must encode every other input, e.g.
        ``"margins-tin-aux"``); computed once. ``compute=None``: only look it up (None when absent)."""
        path = self.folder(sha256) / f"{name}.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        if compute is None:
            return None
        value = compute()
        _write_json_once(path, value)
        return value

    def evaluation(self, sha256: str, scores: Sequence[Score], ood: Sequence[str], num_ood: int | None,
                   compute: Compute | None) -> StoredEvaluation | None:
        """The ID metrics and raw scores of checkpoint ``sha256`` for every score x (ID test split + ``ood``).

        What is not cached yet is computed with ``compute(score names, OOD set names)`` — only the scores and
        sets that miss something — and stored; with ``compute=None`` a missing piece gives None."""
        names = [s.name for s in scores]
        if len(set(names)) != len(names):
            raise ConfigError(f"each score may appear once per evaluation, got {names}")
        folder = self.folder(sha256)
        paths = {s.name: {d: folder / score_key(s) / (f"{dataset_key(d, num_ood)}{self.set_suffix}.npy" if d != ID
                                                     else f"{self.id_file}.npy")
                          for d in [*ood, ID]} for s in scores}
        info_path = folder / self.info_file
        missing = {s: [d for d, p in by_set.items()
                       if not p.exists() or (d != ID and not self.row_path(p).exists())]
                   for s, by_set in paths.items()}
        missing = {s: ([*ood, ID] if ID in sets else sets) for s, sets in missing.items() if sets}
        if missing or not info_path.exists():
            if compute is None:
                return None
            todo_scores = list(missing) or names[:1]
            todo_sets = list(dict.fromkeys(d for sets in missing.values() for d in sets if d != ID)) or list(ood[:1])
            report = compute(todo_scores, todo_sets)
            for score in scores:
                self._write_options(folder / score_key(score), score)
            for name, sets in missing.items():
                for d in [d for d in sets if d != ID] + [ID]:  # the ID file last: it marks the score complete
                    row_path = self.row_path(paths[name][d])
                    if d != ID and not row_path.exists():
                        row = next(r for r in report.rows if r["score"] == name and r["dataset"] == d)
                        payload: dict[str, Any] = {k: v for k, v in row.items() if k not in ("score", "dataset")}
                        if name in report.sample_frames and d in report.sample_frames[name]:
                            payload["sample_frames"] = report.sample_frames[name][d]
                        _write_json_once(row_path, payload)
                    if d != ID and d in report.sample_inliers.get(name, {}) and \
                            not self.inliers_path(paths[name][d]).exists():
                        _write_array(self.inliers_path(paths[name][d]), report.sample_inliers[name][d])
                    if not paths[name][d].exists():
                        _write_array(paths[name][d], report.scores[name][d])
            if not info_path.exists():
                _write_json_once(info_path, {"sha256": sha256, "id_metrics": report.id_metrics})
        info = json.loads(info_path.read_text())
        rows: dict[str, dict[str, dict[str, Any]]] = {
            s: {d: dict(json.loads(self.row_path(p).read_text())) for d, p in by_set.items() if d != ID}
            for s, by_set in paths.items()}
        frames = {s: {d: row.pop("sample_frames") for d, row in by_set.items() if "sample_frames" in row}
                  for s, by_set in rows.items()}
        for s, by_set in frames.items():  # rows stored before they carried their frame count: one entry per frame
            for d, counts in by_set.items():
                rows[s][d].setdefault("n_ood", len(counts["out"]))
        return StoredEvaluation(
            sha256=info["sha256"], id_metrics=dict(info["id_metrics"]), rows=rows,
            scores={s: {d: _read_array(p) for d, p in by_set.items()} for s, by_set in paths.items()},
            sample_frames={s: f for s, f in frames.items() if f},
            inliers={s: {d: _read_array(self.inliers_path(p)) for d, p in by_set.items()
                         if d != ID and self.inliers_path(p).exists()} for s, by_set in paths.items()})

    @staticmethod
    def _write_options(folder: Path, score: Score) -> None:
        path = folder / "options.json"
        if not path.exists():
            _write_json_once(path, {"score": score.name, "options": score_options(score)})


def _kept(path: Path) -> None:
    log.info("%s was written by another process meanwhile; kept (the same value)", path)


def _write_json_once(path: Path, value: Any) -> None:
    """A JSON cache file, unless another process wrote it first (module docstring)."""
    try:
        write_json(path, value)
    except FileExistsError:
        _kept(path)


def _write_array(path: Path, values: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32), allow_pickle=False)
    try:
        write_atomic(path, lambda fh: fh.write(buf.getvalue()), overwrite=False)
    except FileExistsError:
        _kept(path)


def _read_array(path: Path) -> np.ndarray:
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)

