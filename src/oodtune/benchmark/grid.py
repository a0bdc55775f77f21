"""Running a benchmark: one pretrained checkpoint -> post-hoc rows + fine-tuning rows x seeds, every step a
pipeline call.

Every finished piece is kept under the output folder, so an interrupted benchmark picks up where it stopped:
trained checkpoints (``OUT/pretrain``, ``OUT/runs/<row>-s<seed>``), checked against the configuration before
any work (:mod:`.provenance`), and everything computed from a checkpoint — evaluations (raw per-sample scores
and ID metrics), the outlier prior, the proposed margins — cached under keys made of its inputs (:mod:`.store`),
so adding an OOD set, a score or a row computes exactly what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import pipeline
from ..metrics import detection_metrics, roc_curve
from ..models import read_meta
from ..plots import plot_class_prior, plot_energy_histograms, plot_roc_curves
from ..prior import OutlierPrior
from ..progress import console
from ..report import write_json
from ..training.trainer import FINAL
from .config import BenchmarkConfig, MethodSpec
from .provenance import check_finetuned, check_pretrained
from .store import ID, EvalStore, StoredEvaluation
from .tables import write_results

__all__ = ["Benchmark", "run_benchmark"]


class Benchmark:
    """Runs a :class:`BenchmarkConfig`; see the module docstring."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.source = pipeline.DataSource(cfg.data_root)
        self.store = EvalStore(cfg.out / "evals")

    # -- trained checkpoints ----------------------------------------------------------------------
    def pretrained_path(self) -> Path:
        """The configured checkpoint, or the one this benchmark pretrains under OUT/pretrain."""
        return Path(self.cfg.pretrained) if self.cfg.pretrained else self.out / "pretrain" / FINAL

    def pretrain(self) -> Path:
        """Pretrain (once, resumable) unless a checkpoint is configured or already finished."""
        path = self.pretrained_path()
        if not path.exists() and not self.cfg.pretrained:
            p = self.cfg.pretrain
            pipeline.pretrain(self.out / "pretrain", dataset=self.cfg.id_dataset, arch=self.cfg.arch,
                              data_root=self.source, config=self._pretrain_config(),
                              num_train=p.get("num_train"), imbalance_ratio=p.get("imbalance_ratio"))
        return path

    def _pretrain_config(self) -> Any:
        return self.cfg.train_config("pretrain", None, int(self.cfg.pretrain.get("seed", 0)))

    def run_dir(self, spec: MethodSpec, seed: int) -> Path:
        """Where one fine-tuning run (``spec`` x ``seed``) keeps its checkpoints."""
        return self.out / "runs" / f"{spec.slug}-s{seed}"

    # -- values derived from the pretrained checkpoint (cached by its hash) ------------------------
    def prior_counts(self, ckpt: Path, *, compute: bool = True) -> dict[str, Any] | None:
        """The outlier prior (γ = 1) of the pretrained model on the auxiliary outliers, as OutlierPrior.to_dict."""
        def estimate() -> dict[str, Any]:
            return pipeline.estimate_prior(ckpt, outliers=self.cfg.outliers, data_root=self.source,
                                           device=self.cfg.device).to_dict()
        return self.store.derived(ckpt, f"prior-{self.cfg.outliers}", estimate if compute else None)

    def prior(self, ckpt: Path, gamma: float | None, *, compute: bool = True) -> OutlierPrior | None:
        counts = self.prior_counts(ckpt, compute=compute)
        if counts is None:
            return None
        p = OutlierPrior.from_dict(counts)
        return OutlierPrior(counts=p.counts, gamma=1.0 if gamma is None else gamma, class_names=p.class_names)

    def margins(self, ckpt: Path, *, compute: bool = True) -> dict[str, Any] | None:
        """m_in / m_out proposed by :func:`oodtune.pipeline.propose_margins` (ID *train* data and auxiliary
        outliers, never OOD test sets)."""
        def propose() -> dict[str, Any]:
            return pipeline.propose_margins(ckpt, outliers=self.cfg.outliers, data_root=self.source,
                                            device=self.cfg.device).as_options()
        return self.store.derived(ckpt, f"margins-{self.cfg.outliers}", propose if compute else None)

    def loss_options(self, spec: MethodSpec, ckpt: Path, *, compute: bool = True) -> dict[str, Any] | None:
        """The row's loss options with ``"auto"`` margins resolved (None: not resolvable without computing)."""
        options = dict(spec.loss_options)
        auto = [k for k in ("m_in", "m_out") if options.get(k) == "auto"]
        if auto:
            proposed = self.margins(ckpt, compute=compute)
            if proposed is None:
                return None
            options.update({k: proposed[k] for k in auto})
        return options

    # -- checks before any work --------------------------------------------------------------------
    def check_finished(self, ckpt: Path, *, compute: bool) -> None:
        """Refuse (ConfigError) if a finished checkpoint this config uses was trained with other settings."""
        cfg = self.cfg
        if not cfg.pretrained and ckpt.exists():
            p = cfg.pretrain
            check_pretrained(ckpt, read_meta(ckpt), arch=cfg.arch, dataset=cfg.id_dataset,
                             num_train=p.get("num_train"), imbalance_ratio=p.get("imbalance_ratio"),
                             config=self._pretrain_config())
        for spec in cfg.methods:
            if spec.posthoc:
                continue
            for seed in cfg.seeds:
                final = self.run_dir(spec, seed) / FINAL
                if final.exists():
                    self._check_run(ckpt, spec, seed, final, compute=compute)

    def _check_run(self, ckpt: Path, spec: MethodSpec, seed: int, final: Path, *, compute: bool) -> None:
        options = self.loss_options(spec, ckpt, compute=compute)
        prior = self.prior(ckpt, spec.gamma, compute=compute) if spec.balanced else None
        if options is None or (spec.balanced and prior is None):
            console.print(f"[yellow]{final}: not checked (report-only and its margins/prior were never computed)"
                          "[/yellow]")
            return
        check_finetuned(final, read_meta(final), method=spec.method, scratch=spec.scratch, outliers=self.cfg.outliers,
                        loss_options=options, prior=None if prior is None else prior.to_dict(),
                        config=self.cfg.train_config("finetune", spec, seed), pretrained=ckpt,
                        pretrained_sha256=self.store.sha256(ckpt))

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, ckpt: Path, scores: Sequence[str], *, compute: bool) -> StoredEvaluation | None:
        """ID metrics and raw scores of ``ckpt`` for ``scores`` on the ID test split and every OOD set; what is
        not cached is computed (``compute``) or reported missing (None)."""
        def run(names: list[str], ood: list[str]) -> Any:
            report, _ = pipeline.evaluate_checkpoint(ckpt, scores=names, ood=ood, data_root=self.source,
                                                     device=self.cfg.device, num_ood=self.cfg.num_ood)
            return report
        built = pipeline.build_scores(ckpt, list(dict.fromkeys(scores)))
        return self.store.evaluation(ckpt, built, self.cfg.ood_near + self.cfg.ood_far, self.cfg.num_ood,
                                     run if compute else None)

    def record(self, ev: StoredEvaluation, score: str, *, seed: int | None, train_seconds: float | None
               ) -> dict[str, Any]:
        """One run's row for the tables: ID metrics, fine-tuning time and detection metrics per OOD set."""
        s = ev.scores[score]
        rows = [{"dataset": d, **detection_metrics(s[ID], s[d])} for d in self.cfg.ood_near + self.cfg.ood_far]
        return {"seed": seed, "checkpoint_sha256": ev.sha256, "score": score, **ev.id_metrics,
                "train_seconds": train_seconds, "rows": rows}

    # -- the grid -----------------------------------------------------------------------------------
    def run(self, command: str, *, report_only: bool = False) -> list[Path]:
        """Run every missing piece, then write the tables. ``report_only`` trains and evaluates nothing:
        it tabulates the runs already finished and evaluated and lists the rest; rows left out by ``cfg.only``
        are treated the same way."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.pretrained_path()
        self.check_finished(ckpt, compute=not report_only)
        if not report_only:
            ckpt = self.pretrain()
        results: dict[str, list[dict[str, Any]]] = {}
        missing: list[str] = []
        plot_scores = {spec.score for spec in cfg.methods if not spec.posthoc}
        base = None
        if ckpt.exists():
            base = self.evaluate(ckpt, ["energy", *sorted(plot_scores - {"energy"})], compute=not report_only)
            self._write_prior_outputs(ckpt, compute=not report_only)
        for spec in cfg.methods:
            tabulate_only = report_only or not cfg.selected(spec)
            if spec.posthoc:
                ev = self.evaluate(ckpt, [spec.method], compute=not tabulate_only) if ckpt.exists() else None
                if ev is None:
                    missing.append(f"{spec.label} (post-hoc, pretrained model)")
                else:
                    results[spec.label] = [self.record(ev, spec.method, seed=None, train_seconds=None)]
                continue
            runs, first = [], None
            for seed in cfg.seeds:
                ev = self._finetuned(ckpt, spec, seed, train=not tabulate_only)
                if ev is None:
                    missing.append(f"{spec.label} seed {seed}")
                    continue
                final = self.run_dir(spec, seed) / FINAL
                runs.append(self.record(ev, spec.score, seed=seed, train_seconds=read_meta(final).seconds_trained))
                first = first or ev
            if runs:
                results[spec.label] = runs
            if base is not None and first is not None:
                self._plots(spec, base, first)
        return write_results(cfg, results, command, missing)

    def _finetuned(self, ckpt: Path, spec: MethodSpec, seed: int, *, train: bool) -> StoredEvaluation | None:
        """Train (if allowed and not finished) and evaluate one run; None when it is not available."""
        run_dir = self.run_dir(spec, seed)
        if not (run_dir / FINAL).exists():
            if not train:
                return None
            console.rule(f"{spec.label} seed {seed}")
            options = self.loss_options(spec, ckpt)
            pipeline.finetune(ckpt, run_dir, method=spec.method, data_root=self.source, outliers=self.cfg.outliers,
                              prior=self.prior(ckpt, spec.gamma) if spec.balanced else None, loss_options=options,
                              from_scratch=spec.scratch, config=self.cfg.train_config("finetune", spec, seed))
        return self.evaluate(run_dir / FINAL, list(dict.fromkeys([spec.score, "energy"])), compute=train)

    # -- outputs beside the tables -------------------------------------------------------------------
    def _write_prior_outputs(self, ckpt: Path, *, compute: bool) -> None:
        """OUT/prior.json, OUT/margins.json and OUT/prior.png (P and the P_γ the balanced rows use), when the
        config uses them."""
        gammas = sorted({1.0 if s.gamma is None else s.gamma for s in self.cfg.methods if s.balanced})
        if gammas:
            prior = self.prior(ckpt, gammas[0], compute=compute)
            if prior is not None:
                prior.save(self.out / "prior.json", overwrite=True)
                plot_class_prior(self.out / "prior.png", list(read_meta(ckpt).class_counts) or [0] * prior.num_classes,
                                 prior.probabilities().tolist(), prior.class_names,
                                 gamma_priors={g: OutlierPrior(prior.counts, g).gamma_prior().tolist()
                                               for g in gammas if g != 1.0})
        if any("auto" in (s.loss_options.get("m_in"), s.loss_options.get("m_out")) for s in self.cfg.methods):
            margins = self.margins(ckpt, compute=compute)
            if margins is not None:
                write_json(self.out / "margins.json", margins, overwrite=True)

    def _plots(self, spec: MethodSpec, before: StoredEvaluation, after: StoredEvaluation) -> None:
        """Energy histograms before | after fine-tuning (seed ``cfg.seeds[0]``, or the first finished one) and ROC
        curves of the row's own score, per OOD set, pretrained (dashed) vs fine-tuned (solid)."""
        sets = self.cfg.ood_near + self.cfg.ood_far

        def energies(ev: StoredEvaluation) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            e = ev.scores["energy"]
            return -e[ID], {d: -e[d] for d in sets}

        seed = next((r for r in self.cfg.seeds if (self.run_dir(spec, r) / FINAL).exists()), self.cfg.seeds[0])
        plot_energy_histograms(self.out / f"energy-{spec.slug}.png", *energies(after),
                               title=f"{spec.label} (seed {seed})", before=energies(before))
        curves = {(model, d): roc_curve(ev.scores[spec.score][ID], ev.scores[spec.score][d])
                  for model, ev in (("pretrained", before), (spec.label, after)) for d in sets}
        plot_roc_curves(self.out / f"roc-{spec.slug}.png", curves,
                        title=f"ROC per OOD set, score {spec.score}: {spec.label} (seed {seed}) vs pretrained")


def run_benchmark(cfg: BenchmarkConfig, command: str, *, report_only: bool = False) -> list[Path]:
    """Run (or resume) the benchmark; returns the written result files."""
    return Benchmark(cfg).run(command, report_only=report_only)

