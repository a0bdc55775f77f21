"""A reproducible grid: one pretrained checkpoint -> post-hoc baselines + fine-tuning methods x seeds x OOD sets.

Every finished piece is stored under the output folder (fine-tuned checkpoints, per-run evaluation JSON),
so an interrupted benchmark picks up where it stopped. The summary reports mean ± std over seeds (std over
the seeds' values, ddof=0 is *not* used: sample std, ddof=1, as is usual for "mean ± std over N runs").
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

from .data import load_dataset
from .data.imageset import ImageSet
from .evaluation import METRIC_KEYS, EvalReport, evaluate
from .metrics import roc_curve
from .models import FeatureModel
from .pipeline import estimate_prior, finetune, id_train_set, normalizer_for, pretrain
from .plots import plot_class_prior, plot_energy_histograms, plot_roc_curves
from .prior import OutlierPrior
from .progress import console
from .report import markdown_table, write_json, write_text_atomic
from .scores import build_score
from .training.checkpoint import load_model, read_checkpoint
from .training.trainer import FINAL, TrainConfig

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

    @property
    def groups(self) -> dict[str, str]:
        return {**{n: "near" for n in self.ood_near}, **{n: "far" for n in self.ood_far}}


def load_benchmark_config(path: str | Path, *, data_root: str | None = None, device: str | None = None,
                          out: str | None = None) -> BenchmarkConfig:
    """Read a benchmark TOML; command-line overrides win over the file."""
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
    return BenchmarkConfig(
        name=b.get("name", Path(path).stem), out=Path(out or b.get("out", f"runs/{Path(path).stem}")),
        data_root=data_root or b.get("data_root"), device=device or b.get("device"),
        seeds=list(b.get("seeds", [0])), id_dataset=b.get("id_dataset", "cifar10"), arch=b.get("arch", "wrn-40-2"),
        pretrain=dict(raw.get("pretrain", {})), finetune=dict(raw.get("finetune", {})),
        outliers=b.get("outliers", "tin-aux"), ood_near=list(b.get("ood_near", [])), ood_far=list(b.get("ood_far", [])),
        num_ood=b.get("num_ood"), methods=methods, pretrained=b.get("pretrained"),
    )


def _train_config(base: dict[str, Any], override: dict[str, Any], seed: int, device: str | None) -> TrainConfig:
    kw = {k: v for k, v in {**base, **override}.items() if k in TRAIN_KEYS}
    return TrainConfig(**{**kw, "seed": seed, "device": device})


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


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

    def evaluate(self, ckpt: Path, score: str, cache: Path) -> dict[str, Any]:
        """Evaluate ``ckpt`` with ``score`` (and energy, for the plots); cached in ``cache`` as JSON."""
        if cache.exists():
            return json.loads(cache.read_text())
        model, meta = load_model(ckpt)
        res = int(meta["resolution"])
        scores = [build_score(score)] + ([build_score("energy")] if score != "energy" else [])
        id_test = load_dataset(meta["dataset"], self.cfg.data_root, "test", resolution=res)
        id_train = id_train_set(meta, self.cfg.data_root) if any(s.needs_fit for s in scores) else None
        t0 = time.perf_counter()
        report: EvalReport = evaluate(FeatureModel(model), normalizer_for(meta), id_test, self.ood_sets(res), scores,
                                      id_train=id_train, device=self.cfg.device)
        history = meta.get("history") or []
        result = {
            "checkpoint": str(ckpt), "score": score, "accuracy": 100 * report.accuracy,
            "train_seconds": float(sum(h["seconds"] for h in history)) if meta.get("stage") != "pretrain" else 0.0,
            "eval_seconds": time.perf_counter() - t0,
            "rows": [r for r in report.rows if r["score"] == score],
            "energy": {k: (-v).tolist() for k, v in report.scores["energy"].items()},
        }
        write_json(cache, result)
        return result

    def run(self, command: str) -> list[Path]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.pretrained_checkpoint()
        results: dict[str, list[dict[str, Any]]] = {}
        base_energy = self.evaluate(ckpt, "energy", self.out / "evals" / "pretrained-energy.json")["energy"]
        for spec in cfg.methods:
            if spec.posthoc:
                results[spec.label] = [self.evaluate(ckpt, spec.method, self.out / "evals" / f"pretrained-{spec.method}.json")]
                continue
            prior = None
            if "balanced" in spec.method:
                prior = self.prior(ckpt)
                prior = OutlierPrior(counts=prior.counts, gamma=spec.gamma if spec.gamma is not None else 1.0,
                                     class_names=prior.class_names)
            runs = []
            for seed in cfg.seeds:
                run_dir = self.out / "runs" / f"{spec.slug}-s{seed}"
                if not (run_dir / FINAL).exists() and not (run_dir / "eval.json").exists():
                    console.rule(f"{spec.label} seed {seed}")
                    base = cfg.pretrain if spec.scratch else {"epochs": 10, "lr": 1e-3, **cfg.finetune}
                    finetune(ckpt, run_dir, method=spec.method, data_root=cfg.data_root, outliers=cfg.outliers,
                             prior=prior, loss_options=spec.loss_options, from_scratch=spec.scratch,
                             config=_train_config({**cfg.finetune, **base}, spec.train, seed, cfg.device))
                runs.append(self.evaluate(run_dir / FINAL, spec.score, run_dir / "eval.json"))
            results[spec.label] = runs
            self._plots(spec, base_energy, runs[0]["energy"])
        return self._write(results, command)

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

    def _write(self, results: dict[str, list[dict[str, Any]]], command: str) -> list[Path]:
        groups = self.cfg.groups
        summary, per_set = [], []
        for label, runs in results.items():
            row: dict[str, Any] = {"method": label, "seeds": len(runs),
                                   "accuracy": _mean_std([r["accuracy"] for r in runs]),
                                   "train_seconds": _mean_std([r["train_seconds"] for r in runs])}
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
              f"ID: {self.cfg.id_dataset}, {self.cfg.arch}; seeds {self.cfg.seeds}; mean ± std over seeds "
              "(post-hoc rows use the single pretrained model). Metrics in %.\n"]
        for bucket in ("all", "near", "far"):
            cols = ["method", "accuracy"] + [f"{m}_{bucket}" for m in METRIC_KEYS] + ["train_seconds"]
            if any(c in summary[0] for c in cols[2:-1]):
                md.append(f"\n## Average over {bucket} OOD sets\n\n")
                md.append(markdown_table(summary, cols, ["method", "ID acc", "AUROC↑", "AUPR-In↑", "AUPR-Out↑",
                                                         "FPR95↓", "fine-tune s"]))
        md.append("\n## Per OOD set\n\n")
        md.append(markdown_table(per_set, ["method", "dataset", "group", *METRIC_KEYS]))
        mdp = write_text_atomic(self.out / "results.md", "".join(md), overwrite=True)
        return [js, mdp]


def run_benchmark(cfg: BenchmarkConfig, command: str) -> list[Path]:
    """Run (or resume) the benchmark; returns the written result files."""
    return Benchmark(cfg).run(command)
