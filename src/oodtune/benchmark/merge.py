"""Taking the stored work of another output folder of the same benchmark into this one (``oodtune benchmark
CONFIG --merge DIR``), so that runs trained elsewhere — on another machine, a GPU, at an earlier time, by
another ``--only`` process with its own ``--out`` — are tabulated and compared in one report.

Per sub-benchmark (the output folder itself, or ``pretrain-s<K>`` of a nested benchmark), DIR mirroring OUT:

* **Runs** — every checkpoint folder the config names (``pretrain`` when the benchmark pretrains its model,
  ``runs/<row>-s<seed>`` for every fine-tuned row and seed). A *finished* run of DIR (``model.pt``, or its
  ``run.json`` record when the weights were deleted) is copied whole — less its hidden files (the lock, writers'
  temporaries), as everywhere below — into a temporary folder beside its place and renamed into it, so a crash
  never leaves half a run. One already here with the same weights (SHA-256) is left as
  it is; one here with other weights, or an unfinished one here, is a conflict (:class:`MergeError`, naming both
  folders: delete the one you do not want). An unfinished run of DIR is not taken; the summary lists it.
* **Evaluations** (``evals/<checkpoint>/``, content-addressed by the checkpoint's SHA-256 and every input,
  :mod:`.store`): a score folder (one score's options, metrics rows and raw scores) missing here is taken whole;
  one present on both sides gets only the files it misses, and only when every file both hold is byte-identical —
  otherwise (two machines evaluated the same checkpoint and scored it a little differently, e.g. in bf16) this
  folder's copy is kept whole, and the summary names it. The JSON files beside them (ID metrics, outlier prior,
  margins) are copied when missing and kept, named, when they differ.

Nothing here is ever replaced. The taken runs are then checked against the config like every other finished run
before anything uses them (:mod:`.provenance`: a run fine-tuned from another pretrained checkpoint, or with other
settings than the config's, is refused with the setting that differs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, MergeError
from ..training.trainer import FINAL
from ..utils.atomic import file_sha256, storage_errors, temporary_path, write_atomic
from ..utils.lock import output_lock
from .compare import sub_benchmarks
from .config import BenchmarkConfig
from .grid import RUN_RECORD, run_folder

__all__ = ["MergeSummary", "merge_outputs"]

#: Names starting with this are not stored work: the lock file and writers' temporaries (``.NAME.tmp-...``).
HIDDEN = "."


@dataclass
class MergeSummary:
    """What one merge took (paths relative to the benchmark's output folder)."""

    source: Path
    runs: list[str] = field(default_factory=list)  #: finished runs copied in
    present: list[str] = field(default_factory=list)  #: finished runs both folders hold, with the same weights
    unfinished: list[str] = field(default_factory=list)  #: runs of the source that had not finished: not taken
    files: int = 0  #: evaluation files copied in
    kept: list[str] = field(default_factory=list)  #: evaluations both hold with different values: this folder's kept

    def describe(self) -> str:
        """One paragraph for the terminal or a log."""
        parts = [f"merged {self.source}: {len(self.runs)} run(s) taken"
                 + (f" ({', '.join(self.runs)})" if self.runs else ""),
                 f"{len(self.present)} already here", f"{self.files} evaluation file(s) taken"]
        if self.unfinished:
            parts.append(f"not taken, unfinished there: {', '.join(self.unfinished)}")
        if self.kept:
            parts.append("evaluated on both sides with different values, this folder's kept: "
                         + ", ".join(self.kept))
        return "; ".join(parts)


def merge_outputs(cfg: BenchmarkConfig, source: str | os.PathLike) -> MergeSummary:
    """Take the finished runs and stored evaluations of ``source`` (another output folder of ``cfg``'s benchmark)
    into ``cfg.out`` (module docstring); each sub-benchmark's folder is locked against other writers meanwhile."""
    src_root = Path(source)
    if not src_root.is_dir():
        raise ConfigError(f"--merge {source}: no such folder; give the output folder (OUT) of another run of this "
                          "benchmark.")
    if src_root.resolve() == cfg.out.resolve():
        raise ConfigError(f"--merge {source} is this benchmark's own output folder; give the folder to take runs from.")
    summary = MergeSummary(src_root)
    for _, sub in sub_benchmarks(cfg):
        src = src_root / sub.out.relative_to(cfg.out)
        if not src.is_dir():
            continue
        with output_lock(sub.out):
            for run in _run_folders(sub):
                _merge_run(src / run.relative_to(sub.out), run, cfg.out, summary)
            if (src / "evals").is_dir():
                _merge_evals(src / "evals", sub.out / "evals", cfg.out, summary)
    return summary


def _run_folders(cfg: BenchmarkConfig) -> Iterator[Path]:
    """Every checkpoint folder the (sub-)benchmark ``cfg`` trains into."""
    if not cfg.pretrained:
        yield cfg.out / "pretrain"
    for spec in cfg.methods:
        for seed in ([] if spec.posthoc else cfg.seeds):
            yield run_folder(cfg.out, spec, seed)


def _weights(run: Path) -> str | None:
    """The SHA-256 of a finished run's weights (from its record when the weights were deleted); None when the run
    has not finished."""
    if (run / FINAL).exists():
        return file_sha256(run / FINAL)
    if (run / RUN_RECORD).exists():
        return str(json.loads((run / RUN_RECORD).read_text())["sha256"])
    return None


def _merge_run(src: Path, dst: Path, root: Path, summary: MergeSummary) -> None:
    if not src.is_dir():
        return
    name = str(dst.relative_to(root))
    theirs = _weights(src)
    if theirs is None:
        summary.unfinished.append(name)
        return
    if dst.exists():
        ours = _weights(dst)
        if ours == theirs:
            summary.present.append(name)
            return
        state = "an unfinished run" if ours is None else f"a finished run with other weights ({ours[:12]})"
        raise MergeError(f"{dst} holds {state}, {src} a finished one ({theirs[:12]}); delete the one you do not "
                         "want, then merge again.")
    tmp = temporary_path(dst)
    with storage_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(f"{HIDDEN}*"))
            os.rename(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    summary.runs.append(name)


def _stored(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are stored work: not the hidden ones (the lock file, other writers'
    temporaries)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(HIDDEN))


def _merge_evals(src: Path, dst: Path, root: Path, summary: MergeSummary) -> None:
    for checkpoint in (p for p in _stored(src) if p.is_dir()):
        ours = dst / checkpoint.name
        for entry in _stored(checkpoint):
            target = ours / entry.name
            if entry.is_dir():  # one score's folder: taken as a unit
                files = [p for p in _stored(entry) if p.is_file()]
                both = [p for p in files if (target / p.name).exists()]
                if any(p.read_bytes() != (target / p.name).read_bytes() for p in both):
                    summary.kept.append(str(target.relative_to(root)))
                    continue
                for p in files:
                    if p not in both:
                        _copy_file(p, target / p.name, summary)
            elif not target.exists():
                _copy_file(entry, target, summary)
            elif entry.read_bytes() != target.read_bytes():
                summary.kept.append(str(target.relative_to(root)))


def _copy_file(src: Path, dst: Path, summary: MergeSummary) -> None:
    data = src.read_bytes()
    write_atomic(dst, lambda fh: fh.write(data), overwrite=False)
    summary.files += 1
