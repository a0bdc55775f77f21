"""Running a benchmark: one pretrained checkpoint -> post-hoc rows + fine-tuning rows x seeds, every step a
pipeline call.

Every finished piece is stored under the output folder (pretrained checkpoint, prior, margins, fine-tuned
checkpoints, one evaluation record per run), so an interrupted benchmark picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import pipeline
from ..lock import output_lock
from ..metrics import roc_curve
from ..models.imported import check_trusted, trusted_archs
from ..plots import plot_anomaly_maps, plot_energy_histograms, plot_roc_curves
from ..prior import OutlierPrior
from ..report import write_json
from ..runtime import resolve_device
from ..training.trainer import FINAL
from .config import BenchmarkConfig, MethodSpec
from .matrix import PRETRAINED, MatrixModel, run_matrix
from .tables import write_results

__all__ = ["Benchmark", "run_benchmark"]

log = logging.getLogger(__name__)
#: How many frames of the first OOD set the before/after anomaly-map figures of segmentation benchmarks show.
MAP_FRAMES = 4


class Benchmark:
    """Runs a :class:`BenchmarkConfig`; see the module docstring."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.source = pipeline.DataSource(cfg.data_root)

    def pretrained_checkpoint(self) -> Path:
        """The configured checkpoint, or the one this benchmark pretrains (once) under OUT/pretrain."""
        if self.cfg.pretrained:
            return Path(self.cfg.pretrained)
        path = self.out / "pretrain" / FINAL
        if not path.exists():
            p = self.cfg.pretrain
            pipeline.pretrain(self.out / "pretrain", dataset=self.cfg.id_dataset, arch=self.cfg.arch,
                              data_root=self.source,
                              config=self.cfg.train_config("pretrain", None, int(p.get("seed", 0))),
                              num_train=p.get("num_train"), imbalance_ratio=p.get("imbalance_ratio"),
                              val_fraction=p.get("val_fraction"))
        return path

    def run_dir(self, spec: MethodSpec, seed: int) -> Path:
        """Where one fine-tuning run (``spec`` x ``seed``) keeps its checkpoints and ``eval.json``."""
        return self.out / "runs" / f"{spec.slug}-s{seed}"

    def prior(self, ckpt: Path, gamma: float | None) -> OutlierPrior:
        """The outlier prior of the pretrained model (estimated once, OUT/prior.json + prior.png) at ``gamma``."""
        path = self.out / "prior.json"
        if path.exists():
            prior = OutlierPrior.load(path)
        else:
            prior = pipeline.estimate_prior(ckpt, outliers=self.cfg.outliers, data_root=self.source,
                                            device=self.cfg.device)
            pipeline.save_prior(prior, path, checkpoint=ckpt, plot=self.out / "prior.png")
        return OutlierPrior(counts=prior.counts, gamma=1.0 if gamma is None else gamma, class_names=prior.class_names)

    def margins(self, ckpt: Path, options: dict[str, Any]) -> dict[str, float]:
        """Resolve ``m_in``/``m_out = "auto"`` with :func:`oodtune.pipeline.propose_margins` (ID *train* data and
        auxiliary outliers, never OOD test sets); cached in OUT/margins.json."""
        path = self.out / "margins.json"
        if path.exists():
            proposed = json.loads(path.read_text())
        else:
            proposed = pipeline.propose_margins(ckpt, outliers=self.cfg.outliers, data_root=self.source,
                                                device=self.cfg.device).as_options()
            write_json(path, proposed)
        return {k: proposed[k] for k in ("m_in", "m_out") if options.get(k) == "auto"}

    def evaluate(self, ckpt: Path, score: str, cache: Path, *, trained: bool) -> dict[str, Any]:
        """Evaluate ``ckpt`` with ``score`` (and energy, for the plots); the record is cached in ``cache``."""
        if cache.exists():
            return dict(json.loads(cache.read_text()))
        return self._evaluate_scores(ckpt, {score: cache}, trained=trained)[score]

    def _evaluate_scores(self, ckpt: Path, caches: dict[str, Path], *, trained: bool) -> dict[str, dict[str, Any]]:
        """One evaluation of ``ckpt`` with every score of ``caches`` (and energy): one forward pass per data set
        serves them all; each score's record is written to its cache."""
        scores = list(dict.fromkeys([*caches, "energy"]))
        report, meta = pipeline.evaluate_checkpoint(ckpt, scores=scores, ood=self.cfg.ood_near + self.cfg.ood_far,
                                                    data_root=self.source, device=self.cfg.device,
                                                    num_ood=self.cfg.num_ood, id_split=self.cfg.id_split)
        records = {}
        for score, cache in caches.items():
            records[score] = {
                "checkpoint": str(ckpt), "score": score, **report.id_metrics,
                "train_seconds": meta.seconds_trained if trained else None, "eval_seconds": report.seconds,
                "rows": [r for r in report.rows if r["score"] == score],
                "energy": {k: (-v).tolist() for k, v in report.scores["energy"].items()},
            }
            write_json(cache, records[score])
        return records

    def _posthoc_cache(self, spec: MethodSpec) -> Path:
        return self.out / "evals" / f"pretrained-{spec.method}.json"

    def run(self, command: str, *, report_only: bool = False) -> list[Path]:
        """Run every missing piece, then write the tables. ``report_only`` trains and evaluates nothing:
        it tabulates the runs already finished (e.g. when a GPU session ran out) and lists the rest; rows left
        out by ``cfg.only`` are treated the same way."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if report_only:  # never train: the configured checkpoint, or the one this benchmark pretrained
            ckpt = Path(cfg.pretrained) if cfg.pretrained else self.out / "pretrain" / FINAL
        else:
            ckpt = self.pretrained_checkpoint()
        results: dict[str, list[dict[str, Any]]] = {}
        missing: list[str] = []
        base_cache = self.out / "evals" / "pretrained-energy.json"
        if not report_only:  # the post-hoc rows still to run share one evaluation of the pretrained model
            todo = {s.method: self._posthoc_cache(s) for s in cfg.methods
                    if s.posthoc and cfg.selected(s) and not self._posthoc_cache(s).exists()}
            if todo and not base_cache.exists():
                todo["energy"] = base_cache
            if todo:
                self._evaluate_scores(ckpt, todo, trained=False)
        base_energy = (None if report_only and not base_cache.exists()
                       else self.evaluate(ckpt, "energy", base_cache, trained=False)["energy"])
        for spec in cfg.methods:
            tabulate_only = report_only or not cfg.selected(spec)
            if spec.posthoc:
                cache = self._posthoc_cache(spec)
                if tabulate_only and not cache.exists():
                    missing.append(f"{spec.label} (post-hoc, pretrained model)")
                else:
                    results[spec.label] = [self.evaluate(ckpt, spec.method, cache, trained=False)]
                continue
            if tabulate_only:
                caches = [self.run_dir(spec, seed) / "eval.json" for seed in cfg.seeds]
                missing += [f"{spec.label} seed {seed}" for seed, c in zip(cfg.seeds, caches, strict=True)
                            if not c.exists()]
                runs = [json.loads(c.read_text()) for c in caches if c.exists()]
                if runs:
                    results[spec.label] = runs
                    if base_energy is not None:
                        self._plots(spec, base_energy, runs[0]["energy"])
                    if cfg.task == "segmentation":
                        self._anomaly_maps(ckpt, spec)
                continue
            results[spec.label] = [self._train_and_evaluate(ckpt, spec, seed) for seed in cfg.seeds]
            if base_energy is not None:
                self._plots(spec, base_energy, results[spec.label][0]["energy"])
            if cfg.task == "segmentation":
                self._anomaly_maps(ckpt, spec)
        paths = write_results(cfg, results, command, missing)
        return paths + (self.matrix(ckpt, command, report_only=report_only) if cfg.matrix else [])

    def matrix(self, ckpt: Path, command: str, *, report_only: bool) -> list[Path]:
        """The score × model matrix (:mod:`.matrix`) over the pretrained model and every finished fine-tuning run;
        with ``report_only`` (and for rows left out by ``cfg.only``) only stored records are tabulated."""
        models = [MatrixModel(PRETRAINED, ckpt)] if ckpt.exists() else []
        frozen = set(models) if report_only else set()
        for spec in self.cfg.methods:
            if spec.posthoc:
                continue
            for seed in self.cfg.seeds:
                final = self.run_dir(spec, seed) / FINAL
                if final.exists():
                    models.append(MatrixModel(spec.label, final, seed))
                    if report_only or not self.cfg.selected(spec):
                        frozen.add(models[-1])
        return run_matrix(self.cfg, self.source, models, command, tabulate_only=frozen)

    def _train_and_evaluate(self, ckpt: Path, spec: MethodSpec, seed: int) -> dict[str, Any]:
        run_dir = self.run_dir(spec, seed)
        if not (run_dir / FINAL).exists() and not (run_dir / "eval.json").exists():
            log.info("── %s seed %d ──", spec.label, seed)
            prior = self.prior(ckpt, spec.gamma) if spec.balanced else None
            options = dict(spec.loss_options)
            if "auto" in (options.get("m_in"), options.get("m_out")):
                options.update(self.margins(ckpt, options))
            pipeline.finetune(ckpt, run_dir, method=spec.method, data_root=self.source, outliers=self.cfg.outliers,
                              prior=prior, loss_options=options, from_scratch=spec.scratch,
                              config=self.cfg.train_config("finetune", spec, seed))
        return self.evaluate(run_dir / FINAL, spec.score, run_dir / "eval.json", trained=True)

    def _anomaly_maps(self, ckpt: Path, spec: MethodSpec) -> None:
        """Frame | ground truth | energy map before | after fine-tuning (seed ``seeds[0]``) for a few frames of the
        first OOD set (OUT/maps-SLUG.png)."""
        path = self.out / f"maps-{spec.slug}.png"
        after = self.run_dir(spec, self.cfg.seeds[0]) / FINAL
        if path.exists() or not after.exists():
            return
        dataset = (self.cfg.ood_near + self.cfg.ood_far)[0]
        frames, labels, before = pipeline.anomaly_examples(ckpt, dataset, MAP_FRAMES, data_root=self.source,
                                                           device=self.cfg.device)
        _, _, tuned = pipeline.anomaly_examples(after, dataset, MAP_FRAMES, data_root=self.source,
                                                device=self.cfg.device)
        plot_anomaly_maps(path, frames, labels, before, tuned,
                          title=f"{dataset}: energy before | after {spec.label} (seed {self.cfg.seeds[0]})")

    def _plots(self, spec: MethodSpec, before: dict[str, list[float]], after: dict[str, list[float]]) -> None:
        def pooled(e: dict[str, list[float]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            return np.asarray(e["id"]), {k: np.asarray(v) for k, v in e.items() if k != "id"}

        (b_id, b_ood), (a_id, a_ood) = pooled(before), pooled(after)
        plot_energy_histograms(self.out / f"energy-{spec.slug}.png", a_id, a_ood,
                               title=f"{spec.label} (seed {self.cfg.seeds[0]})", before=(b_id, b_ood))
        curves = {}
        for tag, (e_id, e_ood) in {"pretrained": (b_id, b_ood), spec.label: (a_id, a_ood)}.items():
            ood_all = np.concatenate(list(e_ood.values()))
            fpr, tpr, _ = roc_curve(-e_id, -ood_all)
            curves[tag] = (fpr, tpr)
        plot_roc_curves(self.out / f"roc-{spec.slug}.png", curves, title=f"ROC, all OOD sets pooled: {spec.label}")


def run_benchmark(cfg: BenchmarkConfig, command: str, *, report_only: bool = False,
                  trust_arch: Sequence[str] = ()) -> list[Path]:
    """Run (or resume) the benchmark; returns the written result files.

    The output folder is locked against a second writer for the whole run and the device is checked first. An
    architecture given as an import path (the config's ``arch``, or that of its ``pretrained`` checkpoint) is
    built only if it is in ``trust_arch`` (the command line's ``--trust-arch``): a file never makes oodtune import
    code."""
    with output_lock(cfg.out), trusted_archs(*trust_arch):
        resolve_device(cfg.device)
        if not cfg.pretrained:
            check_trusted(cfg.arch, "the benchmark config")
        return Benchmark(cfg).run(command, report_only=report_only)
