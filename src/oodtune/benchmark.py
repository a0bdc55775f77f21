"""A reproducible grid: one pretrained checkpoint -> post-hoc baselines + fine-tuning methods x seeds x OOD sets.

Every finished piece is stored under the output folder (fine-tuned checkpoints, per-run evaluation JSON),
so an interrupted benchmark picks up where it stopped. The summary reports mean ± sample std (ddof=1) over
seeds, as is usual for "mean ± std over N runs"; a single run is shown as its plain value.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import load_dataset
from .data.imageset import ImageSet
from .data.longtail import class_splits, split_accuracy
from .evaluation import METRIC_KEYS, EvalReport, evaluate
from .logit_adjust import adjust_logits
from .margins import propose_margins
from .metrics import roc_curve
from .pipeline import estimate_prior, finetune, id_train_set, normalizer_for, pretrain, pretrained_energies
from .plots import plot_class_prior, plot_energy_histograms, plot_roc_curves
from .prior import OutlierPrior
from .progress import console
from .report import markdown_table, write_json, write_text_atomic
from .scores import build_score
from .training.checkpoint import load_feature_model, read_checkpoint
from .training.trainer import FINAL, TrainConfig

LT_KEYS = ("acc_all", "acc_head", "acc_medium", "acc_tail", "la_acc_all", "la_acc_head", "la_acc_medium", "la_acc_tail")
POSTHOC = {"msp", "maxlogit", "entropy", "energy", "odin", "mahalanobis", "knn"}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


@dataclass
class MethodSpec:
    """One row of the benchmark: a post-hoc score on the pretrained model, or a fine-tuning method."""

    label: str
    method: str
    score: str = "energy"
    gamma: float | None = None
    scratch: bool = False  # train from random init with the [pretrain] schedule instead of fine-tuning
    loss_options: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def posthoc(self) -> bool:
        return self.method in POSTHOC

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass
class BenchmarkConfig:
    """Parsed benchmark TOML (see configs/*.toml for documented examples)."""

    name: str
    out: Path
    data_root: str | None
    device: str | None
    seeds: list[int]
    id_dataset: str
    arch: str
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    outliers: str
    ood_near: list[str]
    ood_far: list[str]
    num_ood: int | None
    methods: list[MethodSpec]
    pretrained: str | None = None
    only: list[str] = field(default_factory=list)  # labels/slugs of the rows to run; empty = all

    def selected(self, spec: MethodSpec) -> bool:
        """Whether this invocation may train/evaluate ``spec`` (the others are only tabulated)."""
        return not self.only or spec.label in self.only or spec.slug in self.only

    @property
    def groups(self) -> dict[str, str]:
        return {**{n: "near" for n in self.ood_near}, **{n: "far" for n in self.ood_far}}


def load_benchmark_config(path: str | Path, *, data_root: str | None = None, device: str | None = None,
                          out: str | None = None, only: list[str] | None = None) -> BenchmarkConfig:
    """Read a benchmark TOML; command-line overrides win over the file.

    ``only``: run just these rows, named by label or slug (e.g. to spend a short GPU session on the rows a
    previous one did not finish); the other rows are tabulated from their finished runs, as with
    ``report_only``. An unknown name is an error that lists the valid ones.
    """
    raw = tomllib.loads(Path(path).read_text())
    b = raw.get("benchmark", {})
    methods = []
    for m in raw.get("methods", []):
        m = dict(m)
        label, method = m.pop("label"), m.pop("method")
        spec = MethodSpec(label=label, method=method, score=m.pop("score", "energy"), gamma=m.pop("gamma", None),
                          scratch=bool(m.pop("scratch", False)),
                          train={k: m.pop(k) for k in list(m) if k in TRAIN_KEYS})
        spec.loss_options = m
        methods.append(spec)
    if not methods:
        raise ValueError(f"{path}: no [[methods]] entries.")
    if only:
        names = {n for m in methods for n in (m.label, m.slug)}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"{path}: no method named {unknown}; choose from the slugs "
                             f"{[m.slug for m in methods]} (or the labels).")
    return BenchmarkConfig(
        name=b.get("name", Path(path).stem), out=Path(out or b.get("out", f"runs/{Path(path).stem}")),
        data_root=data_root or b.get("data_root"), device=device or b.get("device"),
        seeds=list(b.get("seeds", [0])), id_dataset=b.get("id_dataset", "cifar10"), arch=b.get("arch", "wrn-40-2"),
        pretrain=dict(raw.get("pretrain", {})), finetune=dict(raw.get("finetune", {})),
        outliers=b.get("outliers", "tin-aux"), ood_near=list(b.get("ood_near", [])), ood_far=list(b.get("ood_far", [])),
        num_ood=b.get("num_ood"), methods=methods, pretrained=b.get("pretrained"), only=list(only or []),
    )


def _train_config(base: dict[str, Any], override: dict[str, Any], seed: int, device: str | None) -> TrainConfig:
    kw = {k: v for k, v in {**base, **override}.items() if k in TRAIN_KEYS}
    return TrainConfig(**{**kw, "seed": seed, "device": device})


def long_tail_accuracy(logits: torch.Tensor, labels: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """For long-tailed training sets: head/medium/tail accuracy, plain and with post-hoc logit adjustment.

    Splits follow ``class_splits`` on the *training* class counts; logit adjustment subtracts
    τ·log(train prior) with τ = 1 (Menon et al. 2021). Empty dict for balanced training sets.
    """
    if not meta.get("imbalance_ratio"):
        return {}
    counts = meta["class_counts"]
    splits = class_splits(counts)
    adjusted = adjust_logits(logits, torch.tensor(counts, dtype=torch.float32))
    out = {}
    for tag, lo in {"": logits, "la_": adjusted}.items():
        out.update({f"{tag}acc_{k}": 100 * v for k, v in split_accuracy(lo.argmax(1), labels, splits).items()})
    return out


def _mean_std(values: list[float]) -> tuple[float, float] | float:
    """(mean, sample std) over runs; a single run is reported as its plain value (no spread to show)."""
    arr = np.asarray(values, dtype=float)
    return float(arr[0]) if len(arr) == 1 else (float(arr.mean()), float(arr.std(ddof=1)))


class Benchmark:
    """Runs a ``BenchmarkConfig``; see module docstring."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self._sets: dict[str, ImageSet] | None = None

    def pretrained_checkpoint(self) -> Path:
        if self.cfg.pretrained:
            return Path(self.cfg.pretrained)
        path = self.out / "pretrain" / FINAL
        if not path.exists():
            p = dict(self.cfg.pretrain)
            extra = {k: p.pop(k) for k in ("num_train", "imbalance_ratio") if k in p}
            pretrain(self.out / "pretrain", dataset=self.cfg.id_dataset, arch=self.cfg.arch, data_root=self.cfg.data_root,
                     config=_train_config(p, {}, int(p.get("seed", 0)), self.cfg.device), **extra)
        return path

    def run_dir(self, spec: MethodSpec, seed: int) -> Path:
        """Where one fine-tuning run (``spec`` x ``seed``) keeps its checkpoints and ``eval.json``."""
        return self.out / "runs" / f"{spec.slug}-s{seed}"

    def ood_sets(self, resolution: int) -> dict[str, ImageSet]:
        if self._sets is None:
            names = self.cfg.ood_near + self.cfg.ood_far
            self._sets = {n: load_dataset(n, self.cfg.data_root, "test", resolution=resolution, num_images=self.cfg.num_ood)
                          for n in names}
        return self._sets

    def prior(self, ckpt: Path) -> OutlierPrior:
        path = self.out / "prior.json"
        if path.exists():
            return OutlierPrior.load(path)
        prior = estimate_prior(ckpt, outliers=self.cfg.outliers, data_root=self.cfg.data_root, device=self.cfg.device)
        prior.save(path)
        meta = read_checkpoint(ckpt)["meta"]
        plot_class_prior(self.out / "prior.png", meta["class_counts"], prior.probabilities().tolist(), prior.class_names)
        return prior

    def margins(self, ckpt: Path, options: dict[str, Any]) -> dict[str, float]:
        """Resolve ``m_in``/``m_out = "auto"`` with ``propose_margins`` on the pretrained model's energies on
        ID *train* data and the auxiliary outliers (never on OOD test sets); cached in OUT/margins.json."""
        path = self.out / "margins.json"
        if path.exists():
            proposed = json.loads(path.read_text())
        else:
            e_in, e_out = pretrained_energies(ckpt, outliers=self.cfg.outliers, data_root=self.cfg.data_root,
                                              device=self.cfg.device)
            m_in, m_out = propose_margins(e_in, e_out)
            proposed = {"m_in": m_in, "m_out": m_out}
            write_json(path, proposed)
        return {k: proposed[k] for k in ("m_in", "m_out") if options.get(k) == "auto"}

    def evaluate(self, ckpt: Path, score: str, cache: Path) -> dict[str, Any]:
        """Evaluate ``ckpt`` with ``score`` (and energy, for the plots); cached in ``cache`` as JSON."""
        if cache.exists():
            return json.loads(cache.read_text())
        net, meta = load_feature_model(ckpt)
        res = int(meta["resolution"])
        scores = [build_score(score)] + ([build_score("energy")] if score != "energy" else [])
        id_test = load_dataset(meta["dataset"], self.cfg.data_root, "test", resolution=res)
        id_train = id_train_set(meta, self.cfg.data_root) if any(s.needs_fit for s in scores) else None
        t0 = time.perf_counter()
        report: EvalReport = evaluate(net, normalizer_for(meta), id_test, self.ood_sets(res), scores,
                                      id_train=id_train, device=self.cfg.device)
        history = meta.get("history") or []
        result = {
            "checkpoint": str(ckpt), "score": score, "accuracy": 100 * report.accuracy,
            "train_seconds": float(sum(h["seconds"] for h in history)) if meta.get("stage") != "pretrain" else 0.0,
            "eval_seconds": time.perf_counter() - t0,
            "rows": [r for r in report.rows if r["score"] == score],
            **long_tail_accuracy(report.id_logits, id_test.labels, meta),
            "energy": {k: (-v).tolist() for k, v in report.scores["energy"].items()},
        }
        write_json(cache, result)
        return result

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
        base_energy = None if report_only and not base_cache.exists() else self.evaluate(ckpt, "energy", base_cache)["energy"]
        for spec in cfg.methods:
            tabulate_only = report_only or not cfg.selected(spec)
            if spec.posthoc:
                cache = self.out / "evals" / f"pretrained-{spec.method}.json"
                if tabulate_only and not cache.exists():
                    missing.append(f"{spec.label} (post-hoc, pretrained model)")
                else:
                    results[spec.label] = [self.evaluate(ckpt, spec.method, cache)]
                continue
            if tabulate_only:
                caches = [self.run_dir(spec, seed) / "eval.json" for seed in cfg.seeds]
                missing += [f"{spec.label} seed {seed}" for seed, c in zip(cfg.seeds, caches) if not c.exists()]
                runs = [json.loads(c.read_text()) for c in caches if c.exists()]
                if runs:
                    results[spec.label] = runs
                    if base_energy is not None:
                        self._plots(spec, base_energy, runs[0]["energy"])
                continue
            prior = None
            if "balanced" in spec.method:
                prior = self.prior(ckpt)
                prior = OutlierPrior(counts=prior.counts, gamma=spec.gamma if spec.gamma is not None else 1.0,
                                     class_names=prior.class_names)
            if "auto" in (spec.loss_options.get("m_in"), spec.loss_options.get("m_out")):
                spec.loss_options = {**spec.loss_options, **self.margins(ckpt, spec.loss_options)}
            runs = []
            for seed in cfg.seeds:
                run_dir = self.run_dir(spec, seed)
                if not (run_dir / FINAL).exists() and not (run_dir / "eval.json").exists():
                    console.rule(f"{spec.label} seed {seed}")
                    base = cfg.pretrain if spec.scratch else {"epochs": 10, "lr": 1e-3, **cfg.finetune}
                    finetune(ckpt, run_dir, method=spec.method, data_root=cfg.data_root, outliers=cfg.outliers,
                             prior=prior, loss_options=spec.loss_options, from_scratch=spec.scratch,
                             config=_train_config({**cfg.finetune, **base}, spec.train, seed, cfg.device))
                runs.append(self.evaluate(run_dir / FINAL, spec.score, run_dir / "eval.json"))
            results[spec.label] = runs
            self._plots(spec, base_energy, runs[0]["energy"])
        return self._write(results, command, missing)

    def _plots(self, spec: MethodSpec, before: dict[str, list[float]], after: dict[str, list[float]]) -> None:
        def pooled(e: dict[str, list[float]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            return np.asarray(e["id"]), {k: np.asarray(v) for k, v in e.items() if k != "id"}

        (b_id, b_ood), (a_id, a_ood) = pooled(before), pooled(after)
        plot_energy_histograms(self.out / f"energy-{spec.slug}.png", a_id, a_ood,
                               title=f"{spec.label} (seed {self.cfg.seeds[0]})", before=(b_id, b_ood))
        curves = {}
        for tag, (e_id, e_ood) in {"pretrained": (b_id, b_ood), spec.label: (a_id, a_ood)}.items():
            ood_all = np.concatenate(list(e_ood.values()))
            curves[tag] = roc_curve(-e_id, -ood_all)
        plot_roc_curves(self.out / f"roc-{spec.slug}.png", curves, title=f"ROC, all OOD sets pooled: {spec.label}")

    def _write(self, results: dict[str, list[dict[str, Any]]], command: str, missing: list[str]) -> list[Path]:
        groups = self.cfg.groups
        summary, per_set = [], []
        for label, runs in results.items():
            row: dict[str, Any] = {"method": label, "runs": len(runs),
                                   "accuracy": _mean_std([r["accuracy"] for r in runs]),
                                   "train_seconds": _mean_std([r["train_seconds"] for r in runs])}
            for key in LT_KEYS:
                if key in runs[0]:
                    row[key] = _mean_std([r[key] for r in runs])
            buckets = {"all": list(groups)} | {g: [n for n in groups if groups[n] == g] for g in ("near", "far")}
            for bucket, names in buckets.items():
                for m in METRIC_KEYS:
                    per_run = [np.mean([x[m] for x in r["rows"] if x["dataset"] in names]) for r in runs if names]
                    if per_run:
                        row[f"{m}_{bucket}"] = _mean_std(per_run)
            summary.append(row)
            for name in groups:
                vals = {m: _mean_std([next(x[m] for x in r["rows"] if x["dataset"] == name) for r in runs])
                        for m in METRIC_KEYS}
                per_set.append({"method": label, "dataset": name, "group": groups[name], **vals})
        data = {"name": self.cfg.name, "command": command, "seeds": self.cfg.seeds, "arch": self.cfg.arch,
                "id_dataset": self.cfg.id_dataset, "summary": summary, "per_set": per_set}
        js = write_json(self.out / "results.json", data, overwrite=True)
        md = [f"# {self.cfg.name}\n", f"Command: `{command}`\n",
              f"ID: {self.cfg.id_dataset}, {self.cfg.arch}; seeds {self.cfg.seeds}. Fine-tuned rows: mean ± sample "
              "std over `runs` seeds; post-hoc rows score the single pretrained model. Metrics in %; `fine-tune s` "
              "is training wall time, torch.compile warm-up included where used.\n"]
        for bucket in ("all", "near", "far"):
            cols = ["method", "runs", "accuracy"] + [f"{m}_{bucket}" for m in METRIC_KEYS] + ["train_seconds"]
            if summary and any(c in summary[0] for c in cols[2:-1]):
                md.append(f"\n## Average over {bucket} OOD sets\n\n")
                md.append(markdown_table(summary, cols, ["method", "runs", "ID acc", "AUROC↑", "AUPR-In↑", "AUPR-Out↑",
                                                         "FPR95↓", "fine-tune s"]))
        if summary and "acc_head" in summary[0]:
            md.append("\n## Long-tailed ID accuracy (head / medium / tail), plain and with logit adjustment (τ=1)\n\n")
            md.append(markdown_table(summary, ["method", *LT_KEYS]))
        md.append("\n## Per OOD set\n\n")
        md.append(markdown_table(per_set, ["method", "dataset", "group", *METRIC_KEYS]))
        if missing:
            md.append("\n## Not run yet\n\n" + "".join(f"- {m}\n" for m in missing))
            data["missing"] = missing
            js = write_json(self.out / "results.json", data, overwrite=True)
        mdp = write_text_atomic(self.out / "results.md", "".join(md), overwrite=True)
        return [js, mdp]


def run_benchmark(cfg: BenchmarkConfig, command: str, *, report_only: bool = False) -> list[Path]:
    """Run (or resume) the benchmark; returns the written result files."""
    return Benchmark(cfg).run(command, report_only=report_only)
