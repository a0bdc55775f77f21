"""Nested seeds and the comparisons of a benchmark: intervals on every claim.

With ``[benchmark].pretrain_seeds = [p, ...]`` a benchmark is a set of *sub-benchmarks*, one per independently
pretrained model: the same config with ``[pretrain].seed = p`` under ``OUT/pretrain-s<p>`` (each the resumable,
kill -9 safe grid of :mod:`.grid`: every row x ``seeds``, per-image scores of every test image stored). Without
``pretrain_seeds`` the benchmark is its own single sub-benchmark (one pretrained model; the CI then leaves out
pretraining variation, and the tables say so).

From whatever has finished (nothing is trained or evaluated here), :func:`write_comparisons` writes

* ``OUT/comparisons.json`` / ``comparisons.md``: per ``[[comparisons]]`` claim ("``better`` beats ``than``"),
  OOD group (all / near / far) and metric (AUROC, AUPR-Out, FPR95 OOD+, FPR95 ID+), the paired difference
  ``better - than`` with its hierarchical bootstrap 95 % CI (models, then seeds, then images;
  :mod:`oodtune.metrics.bootstrap`) and the verdict: established / refuted / not established;
* ``OUT/forest.png``: the same as a forest plot (difference ± CI per comparison, group and metric);
* for nested seeds, ``OUT/results.{json,md,csv}`` pooled over every finished (model, seed) run;

each listing the (model, seed) cells still pending.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputInUseError
from ..metrics.bootstrap import COMPARED_METRICS, LEVELS, MethodCells, compare_paired, paired_cells
from ..plots import plot_forest
from ..report import markdown_table, provenance, write_json, write_text_atomic
from ..training.trainer import FINAL
from ..utils.lock import output_lock
from .config import BenchmarkConfig
from .grid import Benchmark, run_benchmark
from .store import StoredEvaluation
from .tables import METRIC_HEADERS, write_results

__all__ = ["VERDICT_RULE", "Collected", "collect", "comparison_rows", "run_nested", "sub_benchmarks",
           "write_comparisons"]

log = logging.getLogger(__name__)

VERDICT_RULE = (
    "A claim \"A beats B\" on a metric is **established** when the 95% CI of A − B lies entirely on the side of the "
    "claim (above 0 for AUROC / AUPR, below 0 for FPR95), **refuted** when it lies entirely on the opposite side, "
    "and **not established** when it contains 0 (the data cannot tell; not evidence of no difference). CI: "
    "hierarchical percentile bootstrap — resample the pretrained models, then the fine-tuning seeds within each, "
    "then the ID test images and the images of each OOD set (each set on its own, one draw shared by every model "
    "and both methods, since all are scored on the same images). A − B is the mean over models of the mean over "
    "seeds of the per-run difference; a group's metric is the mean over its OOD sets."
)


def sub_benchmarks(cfg: BenchmarkConfig) -> list[tuple[int | None, BenchmarkConfig]]:
    """(pretrain seed, config) of every sub-benchmark (module docstring); ``[(None, cfg)]`` without nesting."""
    if not cfg.pretrain_seeds:
        return [(None, cfg)]
    return [(p, dataclasses.replace(cfg, out=cfg.out / f"pretrain-s{p}", pretrain={**cfg.pretrain, "seed": p},
                                    pretrain_seeds=[], comparisons=[]))
            for p in cfg.pretrain_seeds]


@dataclasses.dataclass
class Collected:
    """What the finished runs hold: per row label, ``cells[(model, seed)]`` = per-image scores (seed None for
    post-hoc rows), ``records`` for the pooled tables, and the ``pending`` runs."""

    cells: dict[str, dict[tuple[Any, Any], dict[str, Any]]]
    records: dict[str, list[dict[str, Any]]]
    pending: list[str]


def collect(cfg: BenchmarkConfig) -> Collected:
    """Read the stored per-image scores of every finished, evaluated run of every sub-benchmark (computes
    nothing)."""
    out = Collected({spec.label: {} for spec in cfg.methods}, {}, [])
    for p, sub in sub_benchmarks(cfg):
        bench = Benchmark(sub)
        model = 0 if p is None else p
        where = "" if p is None else f"pretrained model s{p}, "
        pre = bench.trained(bench.pretrained_path())
        for spec in cfg.methods:
            seeds: Sequence[int | None] = [None] if spec.posthoc else cfg.seeds
            for seed in seeds:
                ckpt = pre if seed is None else (bench.trained(bench.run_dir(spec, seed) / FINAL)
                                                 if pre is not None else None)
                score = spec.method if spec.posthoc else spec.score
                ev = None if ckpt is None else bench.evaluate(ckpt, [score], compute=False)
                cell = None if ev is None else _cell(ev, score, cfg)
                if ckpt is None or ev is None or cell is None:
                    state = ("not trained" if ckpt is None else "not evaluated" if ev is None else
                             "evaluated before per-frame pixel samples were stored: re-evaluate it")
                    out.pending.append(f"{spec.label} ({where}{'post-hoc' if seed is None else f'seed {seed}'}): "
                                       f"{state}")
                    continue
                out.cells[spec.label][(model, seed)] = cell
                record = bench.record(ev, score, seed=seed, run=None if seed is None else ckpt)
                record["seed"] = seed if p is None else f"p{p}" + ("" if seed is None else f"/s{seed}")
                out.records.setdefault(spec.label, []).append(record)
    return out


def _cell(ev: StoredEvaluation, score: str, cfg: BenchmarkConfig) -> dict[str, Any] | None:
    """The scores a comparison resamples: per-image scores (classification); per anomaly set, the sampled inlier
    and anomaly pixels with their per-frame counts (segmentation; None when stored without them)."""
    if cfg.task != "segmentation":
        return dict(ev.scores[score])
    samples = {}
    for s in cfg.ood_near + cfg.ood_far:
        px = ev.pixel_samples(score, s)
        if px is None:
            return None
        samples[s] = px
    return {**ev.scores[score], "inliers": {s: v[0] for s, v in samples.items()},
            "frames": {s: v[2] for s, v in samples.items()}}


def _groups(cfg: BenchmarkConfig) -> dict[str, list[str]]:
    """The OOD groups a comparison reports: all / near / far (one with the same sets as an earlier one is left out:
    with far sets only, "far" is "all")."""
    groups: dict[str, list[str]] = {}
    for g, sets in (("all", cfg.ood_near + cfg.ood_far), ("near", cfg.ood_near), ("far", cfg.ood_far)):
        if sets and sets not in groups.values():
            groups[g] = list(sets)
    return groups


def _sets(cfg: BenchmarkConfig) -> dict[str, list[str]]:
    """Each OOD set on its own, when there are several (a set's difference is one term of its group's mean)."""
    every = cfg.ood_near + cfg.ood_far
    return {s: [s] for s in every} if len(every) > 1 else {}


def comparison_rows(cfg: BenchmarkConfig, cells: Mapping[str, MethodCells], *, n_boot: int = 2000, seed: int = 0,
                    levels: Sequence[str] = LEVELS) -> list[dict[str, Any]]:
    """One row per comparison x OOD group (``scope`` "group") or OOD set (``scope`` "set", with several sets) x
    metric (JSON-ready), all from the same bootstrap replicates; a comparison with no shared cell yet is one row
    with ``difference`` None."""
    rows: list[dict[str, Any]] = []
    groups, sets = _groups(cfg), _sets(cfg)
    for c in cfg.comparisons:
        a, b = cells.get(c.better, {}), cells.get(c.than, {})
        if not paired_cells(a, b)[2]:
            rows.append({"comparison": c.label, "better": c.better, "than": c.than, "group": "–", "metric": "–",
                         "difference": None, "verdict": "pending"})
            continue
        log.info("bootstrap: %s (%d replicates)", c.label, n_boot)
        for interval in compare_paired(a, b, {**groups, **sets}, n_boot=n_boot, seed=seed, levels=levels):
            rows.append({"comparison": c.label, "better": c.better, "than": c.than, **interval.to_dict(),
                         "scope": "group" if interval.group in groups else "set"})
    return rows


def write_comparisons(cfg: BenchmarkConfig, command: str, *, n_boot: int = 2000, seed: int = 0) -> list[Path]:
    """OUT/comparisons.{json,md}, OUT/forest.png and (nested seeds) the pooled OUT/results.* from the finished
    runs (module docstring)."""
    got = collect(cfg)
    paths: list[Path] = []
    if cfg.pretrain_seeds:
        pooled = {label: runs for label, runs in got.records.items() if runs}
        paths += write_results(cfg, pooled, command, got.pending)
    if not cfg.comparisons:
        return paths
    rows = comparison_rows(cfg, got.cells, n_boot=n_boot, seed=seed)
    models = len(cfg.pretrain_seeds) or 1
    data = {"name": cfg.name, "command": command, **provenance(), "rule": VERDICT_RULE, "n_boot": n_boot,
            "bootstrap_seed": seed, "pretrain_seeds": cfg.pretrain_seeds, "seeds": cfg.seeds,
            "comparisons": [c.to_dict() for c in cfg.comparisons], "rows": rows, "pending": got.pending}
    paths.append(write_json(cfg.out / "comparisons.json", data, overwrite=True))
    for r in rows:
        if r["difference"] is not None:
            r["ci"] = f"[{r['low']:+.2f}, {r['high']:+.2f}]"
            r["metric_header"] = METRIC_HEADERS[r["metric"]]
    md = [f"# {cfg.name}: comparisons\n\n", f"Command: `{command}`\n\n",
          f"{VERDICT_RULE} {n_boot} replicates, bootstrap seed {seed}. Design: {models} pretrained model(s) "
          f"(pretrain seeds {cfg.pretrain_seeds or 'as configured'}) x fine-tuning seeds {cfg.seeds}; `models` / "
          "`cells` = pretrained models / (model, seed) runs that both rows have finished. Differences in metric "
          "points (percent). **AUROC**: P(ID score > OOD score). **AUPR-Out**: average precision with OOD as the "
          "positive class. **FPR95 OOD+**: % of ID test images flagged OOD at the threshold that flags 95% of the "
          "OOD images. **FPR95 ID+**: % of OOD images accepted as ID at the threshold that accepts 95% of the ID "
          "images." + (" Segmentation: the images resampled are the frames of each anomaly set, with their "
                       "sampled inlier and anomaly pixels (the metrics of those pixel samples; ID = inlier pixels, "
                       "OOD = anomaly pixels; plain score maps)." if cfg.task == "segmentation" else "")
          + (" **One pretrained model: the CI leaves out pretraining variation.**" if models == 1 else "")
          + "\n\n"]
    done = [r for r in rows if r["difference"] is not None and r["scope"] == "group"]
    per_set = [r for r in rows if r["difference"] is not None and r["scope"] == "set"]
    keys = ["comparison", "group", "metric_header", "difference", "ci", "verdict", "models", "cells"]
    for title, part, where in (("", done, "OOD group"), ("\n## Per OOD set\n\n", per_set, "OOD set")):
        if part:
            md.append(title + markdown_table(part, keys, ["claim (better vs than)", where, "metric", "difference",
                                                          "95% CI", "verdict", "models", "cells"]))
    if done:
        paths.append(plot_forest(cfg.out / "forest.png", done + per_set, list(COMPARED_METRICS),
                                 {m: METRIC_HEADERS[m] for m in COMPARED_METRICS},
                                 title=f"{cfg.name}: difference ± 95% CI (hierarchical bootstrap)"))
    waiting = [r["comparison"] for r in rows if r["difference"] is None]
    if waiting:
        md.append("\n## Comparisons pending (no run finished by both rows)\n\n" + "".join(f"- {w}\n" for w in waiting))
    if got.pending:
        md.append("\n## Runs pending\n\n" + "".join(f"- {p}\n" for p in got.pending))
    paths.append(write_text_atomic(cfg.out / "comparisons.md", "".join(md), overwrite=True))
    return paths


def run_nested(cfg: BenchmarkConfig, command: str, *, report_only: bool = False, trust_arch: Sequence[str] = (),
               n_boot: int = 2000, bootstrap_seed: int = 0, models: Sequence[int] = ()) -> list[Path]:
    """Run (or resume) every sub-benchmark in turn — only those of the pretrain seeds in ``models`` when given,
    so that several processes can share the models of one nested benchmark — then write the comparisons from
    what has finished; with ``report_only`` nothing is trained or evaluated. Each sub-benchmark's folder is
    locked while it runs, the benchmark's own folder while the comparisons are written (shared with ``report_only``,
    so that they can be read off while other processes train; their files are replaced atomically); a process given
    ``models``, ``--only`` rows or ``--seed`` seeds that finds that folder in use by another leaves the comparisons
    to it (its runs are stored) and says so."""
    unknown = sorted(set(models) - set(cfg.pretrain_seeds))
    if unknown:
        raise ConfigError(f"--pretrain-seed {', '.join(map(str, unknown))}: not in [benchmark].pretrain_seeds "
                          f"{cfg.pretrain_seeds}")
    paths: list[Path] = []
    for p, sub in sub_benchmarks(cfg):
        if models and p not in models:
            continue
        if p is not None:
            log.info("── pretrained model s%d (%s) ──", p, sub.out)
        paths += run_benchmark(sub, command, report_only=report_only, trust_arch=trust_arch)
    if not cfg.comparisons and not cfg.pretrain_seeds:
        return paths  # nothing to pool or compare
    try:  # a --report-only process writes them beside --only / --seed processes still at work (shared lock)
        with output_lock(cfg.out, shared=report_only):
            paths += write_comparisons(cfg, command, n_boot=n_boot, seed=bootstrap_seed)
    except OutputInUseError as exc:
        if not models and not cfg.partial:
            raise
        # another --pretrain-seed / --only / --seed process is still at work there; this one's runs are stored already
        parts = {"pretrained model(s)": [f"s{m}" for m in models], "row(s)": cfg.only,
                 "seed(s)": [str(s) for s in cfg.only_seeds]}
        done = ", ".join(f"{what} {', '.join(names)}" for what, names in parts.items() if names)
        log.warning("%s\nThe runs of %s are stored; the comparisons were left to the other process. Once every "
                    "process has finished: oodtune benchmark CONFIG --report-only", exc, done)
    return paths
