"""Running a benchmark: one pretrained checkpoint -> post-hoc rows + fine-tuning rows x seeds, every step a
pipeline call.

Every finished piece is kept under the output folder, so an interrupted benchmark picks up where it stopped:
trained checkpoints (``OUT/pretrain``, ``OUT/runs/<row>-s<seed>``), each with a ``run.json`` record (its SHA-256
and metadata, which stays when the weights are deleted to save space), checked against the configuration before
any work (:mod:`.provenance`); everything computed from a checkpoint — evaluations (raw per-sample scores and ID
metrics), the outlier prior, the proposed margins — is cached under keys made of its inputs (:mod:`.store`), so
adding an OOD set, a score or a row computes exactly what is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import pipeline
from ..errors import CheckpointError
from ..losses.prior import OutlierPrior
from ..metrics import roc_curve
from ..models import RunMeta, read_meta
from ..models.imported import check_trusted, trusted_archs
from ..plots import plot_anomaly_maps, plot_class_prior, plot_energy_histograms, plot_roc_curves
from ..report import write_json
from ..training.config import TrainConfig
from ..training.trainer import FINAL
from ..utils.lock import output_lock
from ..utils.runtime import inference_precision, resolve_device, resolve_precision
from .config import BenchmarkConfig, MethodSpec
from .matrix import PRETRAINED, MatrixModel, run_matrix
from .provenance import check_finetuned, check_pretrained
from .selection import ID_METRIC, Candidate, candidate, write_selection
from .store import ID, EvalStore, StoredEvaluation
from .tables import write_results

__all__ = ["RUN_RECORD", "Benchmark", "Trained", "run_benchmark", "run_folder"]

log = logging.getLogger(__name__)
#: Beside each checkpoint the benchmark trained: {"sha256", "meta"} of the final weights.
RUN_RECORD = "run.json"
#: How many frames of the first OOD set the before/after anomaly-map figures of segmentation benchmarks show.
MAP_FRAMES = 4


def run_folder(out: Path, spec: MethodSpec, seed: int) -> Path:
    """Where the benchmark writing into ``out`` keeps the checkpoints of one fine-tuning run (``spec`` x ``seed``)."""
    return out / "runs" / f"{spec.slug}-s{seed}"


@dataclass(frozen=True)
class Trained:
    """A finished checkpoint as the benchmark knows it: path (the weights may be gone), metadata, SHA-256."""

    path: Path
    meta: RunMeta
    sha256: str


class Benchmark:
    """Runs a :class:`BenchmarkConfig`; see the module docstring."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.source = pipeline.DataSource(cfg.data_root)
        self.precision = resolve_precision(resolve_device(cfg.device), cfg.finetune.get("precision", "auto"))
        self.store = EvalStore(cfg.out / "evals", id_split=cfg.id_split, precision=self.precision)
        #: segmentation: the evaluations of blurred score maps, stored beside the plain ones
        self.blur_store = EvalStore(cfg.out / "evals", id_split=cfg.id_split, precision=self.precision, blur=True)

    # -- trained checkpoints ----------------------------------------------------------------------
    def pretrained_path(self) -> Path:
        """The configured checkpoint, or the one this benchmark pretrains under OUT/pretrain."""
        return Path(self.cfg.pretrained) if self.cfg.pretrained else self.out / "pretrain" / FINAL

    def pretrain(self) -> Trained:
        """Pretrain (once, resumable) unless a checkpoint is configured or already finished."""
        found = self.trained(self.pretrained_path())
        if found is not None:
            return found
        if self.cfg.pretrained:
            raise CheckpointError(f"pretrained = {self.cfg.pretrained}: the checkpoint does not exist; fix the path in "
                                  "the benchmark config (segmenters are imported first: `oodtune import-model`).")
        p = self.cfg.pretrain
        path = pipeline.pretrain(self.out / "pretrain", dataset=self.cfg.id_dataset, arch=self.cfg.arch,
                                 data_root=self.source, config=self._pretrain_config(), num_train=p.get("num_train"),
                                 imbalance_ratio=p.get("imbalance_ratio"), val_fraction=p.get("val_fraction"))
        return self._identify(path)

    def _pretrain_config(self) -> TrainConfig:
        return self.cfg.train_config("pretrain", None, int(self.cfg.pretrain.get("seed", 0)))

    def run_dir(self, spec: MethodSpec, seed: int) -> Path:
        """Where one fine-tuning run (``spec`` x ``seed``) keeps its checkpoints."""
        return run_folder(self.out, spec, seed)

    def trained(self, final: Path) -> Trained | None:
        """The finished checkpoint ``final``, or its ``run.json`` record alone when the weights were deleted; None
        if the run is not finished."""
        if final.exists():
            return self._identify(final)
        record = final.parent / RUN_RECORD
        if record.exists():
            data = json.loads(record.read_text())
            return Trained(final, RunMeta.from_dict(data["meta"]), str(data["sha256"]))
        return None

    def _identify(self, final: Path) -> Trained:
        """An existing checkpoint; its ``run.json`` record is written (or refreshed) beside it when it lies in OUT."""
        sha, meta = self.store.sha256(final), read_meta(final)
        record = final.parent / RUN_RECORD
        if self.out.resolve() in final.resolve().parents and (
                not record.exists() or json.loads(record.read_text()).get("sha256") != sha):
            write_json(record, {"sha256": sha, "meta": meta.to_dict()}, overwrite=True)
        return Trained(final, meta, sha)

    # -- values derived from the pretrained checkpoint (cached by its hash) ------------------------
    def prior(self, pre: Trained, gamma: float | None, *, compute: bool = True) -> OutlierPrior | None:
        """The outlier prior of the pretrained model on the auxiliary outliers (estimated once), at ``gamma``."""
        def estimate() -> dict[str, Any]:
            return pipeline.estimate_prior(pre.path, outliers=self.cfg.outliers, data_root=self.source,
                                           device=self.cfg.device).to_dict()
        counts = self.store.derived(pre.sha256, f"prior-{self.cfg.outliers}",
                                    estimate if compute and pre.path.exists() else None)
        if counts is None:
            return None
        p = OutlierPrior.from_dict(counts)
        return OutlierPrior(counts=p.counts, gamma=1.0 if gamma is None else gamma, class_names=p.class_names)

    def margins(self, pre: Trained, *, compute: bool = True) -> dict[str, Any] | None:
        """m_in / m_out proposed by :func:`oodtune.pipeline.propose_margins` (ID *train* data and auxiliary
        outliers, never OOD test sets)."""
        def propose() -> dict[str, Any]:
            return pipeline.propose_margins(pre.path, outliers=self.cfg.outliers, data_root=self.source,
                                            device=self.cfg.device).as_options()
        return self.store.derived(pre.sha256, f"margins-{self.cfg.outliers}",
                                  propose if compute and pre.path.exists() else None)

    def loss_options(self, spec: MethodSpec, pre: Trained, *, compute: bool = True) -> dict[str, Any] | None:
        """The row's loss options with ``"auto"`` margins resolved (None: not resolvable without computing)."""
        options = dict(spec.loss_options)
        auto = [k for k in ("m_in", "m_out") if options.get(k) == "auto"]
        if auto:
            proposed = self.margins(pre, compute=compute)
            if proposed is None:
                return None
            options.update({k: proposed[k] for k in auto})
        return options

    # -- checks before any work --------------------------------------------------------------------
    def check_finished(self, pre: Trained | None, *, compute: bool) -> None:
        """Refuse (ConfigError) if a finished checkpoint this config uses was trained with other settings."""
        cfg = self.cfg
        if pre is None:
            return
        if not cfg.pretrained:
            p = cfg.pretrain
            check_pretrained(pre.path, pre.meta, arch=cfg.arch, dataset=cfg.id_dataset, num_train=p.get("num_train"),
                             imbalance_ratio=p.get("imbalance_ratio"), val_fraction=p.get("val_fraction"),
                             config=self._pretrain_config())
        for spec in cfg.methods:
            for seed in ([] if spec.posthoc else cfg.seeds):
                run = self.trained(self.run_dir(spec, seed) / FINAL)
                if run is not None:
                    self._check_run(pre, spec, seed, run, compute=compute)

    def _check_run(self, pre: Trained, spec: MethodSpec, seed: int, run: Trained, *, compute: bool) -> None:
        options = self.loss_options(spec, pre, compute=compute)
        prior = self.prior(pre, spec.gamma, compute=compute) if spec.balanced else None
        if options is None or (spec.balanced and prior is None):
            log.warning("%s: not checked (its margins/prior were never computed here)", run.path)
            return
        check_finetuned(run.path, run.meta, method=spec.method, scratch=spec.scratch, outliers=self.cfg.outliers,
                        loss_options=options, prior=None if prior is None else prior.to_dict(),
                        config=self.cfg.train_config("finetune", spec, seed), pretrained=pre.path,
                        pretrained_sha256=pre.sha256)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, ckpt: Trained, scores: list[str], *, compute: bool, blur: bool = False
                 ) -> StoredEvaluation | None:
        """ID metrics, metrics rows and raw scores of ``ckpt`` for ``scores`` on the ID split (``id_split``) and every
        OOD set (``blur``: of Gaussian-blurred score maps); what is not cached is computed (``compute``, and only
        while the weights exist) or reported missing (None)."""
        built = pipeline.task_of(ckpt.meta).build_scores(ckpt.meta, list(dict.fromkeys(scores)))
        sets = self.cfg.ood_near + self.cfg.ood_far
        both = not blur and True in self.cfg.blur  # the plain maps' forward passes measure the blurred ones too

        def run(names: list[str], ood: list[str], *, blurred: bool = blur, also: bool = both) -> Any:
            report, _ = pipeline.evaluate_checkpoint(ckpt.path, scores=names, ood=ood, data_root=self.source,
                                                     device=self.cfg.device, num_ood=self.cfg.num_ood,
                                                     id_split=self.cfg.id_split, blur=blurred, also_blurred=also)
            if report.blurred is not None:  # stored now; what the blurred store already had is kept
                def reuse(names2: list[str], ood2: list[str]) -> Any:
                    if set(names2) <= set(names) and set(ood2) <= set(ood):
                        return report.blurred
                    return run(names2, ood2, blurred=True, also=False)  # it misses more than was measured
                self.blur_store.evaluation(ckpt.sha256, built, sets, self.cfg.num_ood, reuse)
            return report
        store = self.blur_store if blur else self.store
        return store.evaluation(ckpt.sha256, built, sets, self.cfg.num_ood,
                                run if compute and ckpt.path.exists() else None)

    def record(self, ev: StoredEvaluation, score: str, *, seed: int | None, run: Trained | None) -> dict[str, Any]:
        """One run's row for the tables: ID metrics, fine-tuning time and per-epoch history (None for post-hoc
        rows) and the detection metrics per OOD set its task computed (both FPR95 conventions for classification;
        exact pixel metrics and components for segmentation)."""
        rows = [{"dataset": d, **ev.rows[score][d]} for d in self.cfg.ood_near + self.cfg.ood_far]
        return {"seed": seed, "checkpoint_sha256": ev.sha256, "score": score, **ev.id_metrics,
                "train_seconds": None if run is None else run.meta.seconds_trained,
                "history": None if run is None else [dict(h) for h in run.meta.history], "rows": rows}

    # -- the grid -----------------------------------------------------------------------------------
    def run(self, command: str, *, report_only: bool = False) -> list[Path]:
        """Run every missing piece, then write the tables. ``report_only`` trains and evaluates nothing:
        it tabulates the runs already finished and evaluated and lists the rest; rows left out by ``cfg.only``
        are treated the same way."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        pre = self.trained(self.pretrained_path())
        self.check_finished(pre, compute=not report_only)
        if not report_only:
            pre = self.pretrain()
            # this process's rows train first, so the tables below see the runs other processes finished meanwhile
            for spec in (s for s in cfg.methods if not s.posthoc):
                for seed in cfg.seeds:
                    if cfg.selected(spec, seed):
                        self._finetuned(pre, spec, seed, train=True)
        results: dict[str, list[dict[str, Any]]] = {}
        missing: list[str] = []
        candidates: dict[str, Candidate] = {}  # [selection]: each fine-tuned row's first seed, first map variant
        base = None
        if pre is not None:
            plot_scores = sorted({spec.score for spec in cfg.methods if not spec.posthoc} - {"energy"})
            base = self.evaluate(pre, ["energy", *plot_scores], compute=not report_only)
            self._write_prior_outputs(pre, compute=not report_only)
        for spec in cfg.methods:
            tabulate_only = report_only or not cfg.selected(spec)
            plotted = None  # the first finished seed's plain evaluation: the ROC plots are of plain maps
            for blur in cfg.blur:  # segmentation: the blurred maps' rows are labelled "LABEL +blur"
                label = f"{spec.label} +blur" if blur else spec.label
                if spec.posthoc:
                    ev = (self.evaluate(pre, [spec.method], compute=not tabulate_only, blur=blur)
                          if pre is not None else None)
                    if ev is None:
                        missing.append(f"{label} (post-hoc, pretrained model)")
                    else:
                        results[label] = [self.record(ev, spec.method, seed=None, run=None)]
                    continue
                runs, first = [], None
                for seed in cfg.seeds:
                    compute = not tabulate_only and cfg.selected(spec, seed)
                    run = self._finetuned(pre, spec, seed, train=compute)
                    ev = None if run is None else self.evaluate(run, [spec.score, "energy"], compute=compute,
                                                                blur=blur)
                    if run is None or ev is None:
                        missing.append(f"{label} seed {seed}" + ("" if run is None else " (trained, not evaluated)"))
                        continue
                    runs.append(self.record(ev, spec.score, seed=seed, run=run))
                    first = first or (seed, ev)
                    if cfg.selection and seed == cfg.seeds[0] and blur == cfg.blur[0]:
                        candidates[spec.label] = candidate(spec.label, ev, spec.score, cfg.selection.dataset,
                                                           cfg.selection.metric, ID_METRIC[cfg.task])
                if runs:
                    results[label] = runs
                plotted = plotted if blur else first
            if spec.posthoc:
                continue
            if base is not None and plotted is not None:
                self._plots(spec, base, *plotted)
            if cfg.task == "segmentation" and pre is not None:
                self._anomaly_maps(pre, spec, compute=not tabulate_only and cfg.selected(spec, cfg.seeds[0]))
        paths = write_results(cfg, results, command, missing)
        paths += write_selection(cfg, candidates, None if base is None else base.id_metrics.get(ID_METRIC[cfg.task]),
                                 missing, command)
        return paths + (self.matrix(pre, command, report_only=report_only) if cfg.matrix else [])

    def matrix(self, pre: Trained | None, command: str, *, report_only: bool) -> list[Path]:
        """The score × model matrix (:mod:`.matrix`) over the pretrained model and every finished fine-tuning run
        whose weights exist; with ``report_only`` (and for rows left out by ``cfg.only``) only stored records are
        tabulated."""
        models = [MatrixModel(PRETRAINED, pre.path)] if pre is not None and pre.path.exists() else []
        frozen = set(models) if report_only else set()
        for spec in self.cfg.methods:
            if spec.posthoc:
                continue
            for seed in self.cfg.seeds:
                final = self.run_dir(spec, seed) / FINAL
                if final.exists():
                    models.append(MatrixModel(spec.label, final, seed))
                    if report_only or not self.cfg.selected(spec, seed):
                        frozen.add(models[-1])
        return run_matrix(self.cfg, self.source, models, command, tabulate_only=frozen)

    def _finetuned(self, pre: Trained | None, spec: MethodSpec, seed: int, *, train: bool) -> Trained | None:
        """The finished run ``spec`` x ``seed``, trained now if allowed; None when it is not available."""
        final = self.run_dir(spec, seed) / FINAL
        found = self.trained(final)
        if found is not None or not train or pre is None:
            return found
        log.info("── %s seed %d ──", spec.label, seed)
        pipeline.finetune(pre.path, final.parent, method=spec.method, data_root=self.source, outliers=self.cfg.outliers,
                          prior=self.prior(pre, spec.gamma) if spec.balanced else None,
                          loss_options=self.loss_options(spec, pre), from_scratch=spec.scratch,
                          config=self.cfg.train_config("finetune", spec, seed))
        return self.trained(final)

    # -- outputs beside the tables -------------------------------------------------------------------
    def _write_prior_outputs(self, pre: Trained, *, compute: bool) -> None:
        """OUT/prior.json, OUT/margins.json and OUT/prior.png (P and the P_γ the balanced rows use), when the
        config uses them; computed only for a selected row that needs them, else only looked up."""
        balanced = [s for s in self.cfg.methods if s.balanced]
        auto = [s for s in self.cfg.methods if "auto" in (s.loss_options.get("m_in"), s.loss_options.get("m_out"))]
        gammas = sorted({1.0 if s.gamma is None else s.gamma for s in balanced})
        compute_prior = compute and any(self.cfg.selected(s) for s in balanced)
        prior = self.prior(pre, gammas[0], compute=compute_prior) if gammas else None
        if prior is not None:
            prior.save(self.out / "prior.json", overwrite=True)
            plot_class_prior(self.out / "prior.png", list(pre.meta.class_counts) or [0] * prior.num_classes,
                             prior.probabilities().tolist(), prior.class_names,
                             gamma_priors={g: OutlierPrior(prior.counts, g).gamma_prior().tolist()
                                           for g in gammas if g != 1.0})
        if auto:
            margins = self.margins(pre, compute=compute and any(self.cfg.selected(s) for s in auto))
            if margins is not None:
                write_json(self.out / "margins.json", margins, overwrite=True)

    def _anomaly_maps(self, pre: Trained, spec: MethodSpec, *, compute: bool) -> None:
        """Frame | ground truth | energy score map before | after fine-tuning (seed ``seeds[0]``) for a few frames
        of the first OOD set (OUT/maps-SLUG.png); drawn once, while both checkpoints' weights exist."""
        path = self.out / f"maps-{spec.slug}.png"
        after = self.run_dir(spec, self.cfg.seeds[0]) / FINAL
        if path.exists() or not compute or not after.exists() or not pre.path.exists():
            return
        dataset = (self.cfg.ood_near + self.cfg.ood_far)[0]
        frames, labels, before = pipeline.anomaly_examples(pre.path, dataset, MAP_FRAMES, data_root=self.source,
                                                           device=self.cfg.device)
        _, _, tuned = pipeline.anomaly_examples(after, dataset, MAP_FRAMES, data_root=self.source,
                                                device=self.cfg.device)
        columns = {"pretrained": before, f"{spec.label} (seed {self.cfg.seeds[0]})": tuned}
        plot_anomaly_maps(path, frames, labels, columns,
                          title=f"{dataset}: energy score maps before | after fine-tuning")

    def _plots(self, spec: MethodSpec, before: StoredEvaluation, seed: int, after: StoredEvaluation) -> None:
        """Energy histograms before | after fine-tuning (the first finished seed) and ROC curves of the row's own
        score, per OOD set, pretrained (dashed) vs fine-tuned (solid)."""
        sets = self.cfg.ood_near + self.cfg.ood_far

        def energies(ev: StoredEvaluation) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            e = ev.scores["energy"]
            return -e[ID], {d: -e[d] for d in sets}

        plot_energy_histograms(self.out / f"energy-{spec.slug}.png", *energies(after),
                               title=f"{spec.label} (seed {seed})", before=energies(before))
        curves = {(model, d): roc_curve(ev.scores[spec.score][ID], ev.scores[spec.score][d])
                  for model, ev in (("pretrained", before), (spec.label, after)) for d in sets}
        plot_roc_curves(self.out / f"roc-{spec.slug}.png", curves,
                        title=f"ROC per OOD set, score {spec.score}: {spec.label} (seed {seed}) vs pretrained")


def run_benchmark(cfg: BenchmarkConfig, command: str, *, report_only: bool = False,
                  trust_arch: Sequence[str] = ()) -> list[Path]:
    """Run (or resume) the benchmark; returns the written result files.

    The output folder is locked against a second writer for the whole run — shared among processes given different
    ``--only`` rows or ``--seed`` seeds (``cfg.partial``: each trains only its runs, which the trainer locks, and
    the evaluations they store are content-addressed) and ``report_only`` ones (which write only the tables),
    exclusive otherwise — and the device is checked first. An architecture given as an import path (the config's
    ``arch``, or that of its ``pretrained`` checkpoint) is built only if it is in ``trust_arch`` (the command
    line's ``--trust-arch``): a file never makes oodtune import code."""
    with output_lock(cfg.out, shared=cfg.partial or report_only), trusted_archs(*trust_arch):
        resolve_device(cfg.device)
        if not cfg.pretrained:
            check_trusted(cfg.arch, "the benchmark config")
        bench = Benchmark(cfg)
        with inference_precision(bench.precision):  # evaluations run in the fine-tuning's precision
            return bench.run(command, report_only=report_only)
