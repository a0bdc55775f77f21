"""End-to-end pipeline and benchmark on a tiny offline data root (CIFAR-10 pickles + Tiny ImageNet tree).

Everything is CPU-sized: WRN-10-1, 1 epoch of 1-2 steps, 8 ID + 16 outlier images per batch.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import oodtune.pipeline as pipe
import oodtune.pipeline.classification as classification
import oodtune.pipeline.source as source
from fixtures_data import TINY_TRAINING_TOML, offline_env
from helpers_lock import lock_held_elsewhere
from oodtune.benchmark import load_benchmark_config, run_benchmark
from oodtune.data import load_dataset
from oodtune.data.longtail import longtail_counts
from oodtune.data.protocol import read_split
from oodtune.errors import CheckpointError
from oodtune.metrics import LT_KEYS, long_tail_accuracy
from oodtune.models import read_meta
from oodtune.scores import SCORE_NAMES
from oodtune.training.config import FINETUNE, TrainConfig

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

ARCH = "wrn-10-1"
ALL_SCORES = list(SCORE_NAMES)
NUM_OOD = 16


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"epochs": 1, "batch_size": 8, "outlier_batch_size": 16, "max_steps_per_epoch": 1,
                            "lr": 0.01,
                                "device": "cpu", "precision": "fp32"}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("pipeline"), train_per_class=20, test_per_class=10) as e:
        yield e


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Path]) -> Path:
    return pipe.pretrain(env["tmp"] / "pre", arch=ARCH, data_root=env["root"], config=cfg(max_steps_per_epoch=2))


@pytest.fixture(scope="module")
def pretrained_lt(env: dict[str, Path]) -> Path:
    return pipe.pretrain(env["tmp"] / "pre-lt", arch=ARCH, data_root=env["root"], config=cfg(), imbalance_ratio=2)


@pytest.fixture(scope="module")
def prior(env: dict[str, Path], pretrained: Path) -> Any:
    return pipe.estimate_prior(pretrained, data_root=env["root"], device="cpu", gamma=0.5)


def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ pipeline

def test_pretrain_checkpoint_meta(env, pretrained):
    assert pretrained == env["tmp"] / "pre" / "model.pt"
    ck = _ckpt(pretrained)
    meta = ck["meta"]
    assert meta["stage"] == "pretrain" and meta["dataset"] == "cifar10" and meta["arch"] == ARCH
    assert meta["num_classes"] == 10 and meta["class_counts"] == [20] * 10 and meta["resolution"] == 32
    assert not (env["tmp"] / "pre" / "last.pt").exists()
    assert all(isinstance(v, torch.Tensor) for v in ck["model"].values())


def test_estimate_prior_counts_every_aux_image(env, prior):
    assert sum(prior.counts) == len(read_split()["auxiliary"])  # 1 train image per auxiliary WNID
    assert prior.gamma == 0.5 and len(prior.class_names) == 10
    assert torch.isclose(prior.gamma_prior().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("method", ["energy-oe", "balanced-energy", "sparsity"])
def test_finetune_methods_then_evaluate_all_scores(env, pretrained, prior, method):
    out = env["tmp"] / f"ft-{method}"
    path = pipe.finetune(pretrained, out, method=method, data_root=env["root"],
                         prior=prior if method == "balanced-energy" else None, config=cfg())
    ck = _ckpt(path)
    meta = ck["meta"]
    assert meta["stage"] == "finetune" and meta["method"] == method and meta["dataset"] == "cifar10"
    assert meta["pretrained"] == str(pretrained)
    assert meta["outliers"] == (None if method == "sparsity" else "tin-aux")
    assert (meta["prior"] is not None) == (method == "balanced-energy")
    assert len(meta["history"]) == 1
    if method == "balanced-energy":
        assert "balanced_energy" in meta["history"][0]
    # fine-tuning changed the weights
    before = _ckpt(pretrained)["model"]
    assert any(not torch.equal(before[k], v) for k, v in ck["model"].items() if v.is_floating_point())
    if method != "energy-oe":
        return  # evaluating one fine-tuned model with every score is enough
    report, emeta = pipe.evaluate_checkpoint(path, scores=ALL_SCORES, ood=["tin-near", "gaussian"],
                                             data_root=env["root"], device="cpu", num_ood=NUM_OOD)
    assert emeta.method == method
    assert 0.0 <= report.id_metrics["accuracy"] <= 100.0
    assert [(r["score"], r["dataset"]) for r in report.rows] == [(s, d) for s in ALL_SCORES
                                                                 for d in ("tin-near", "gaussian")]
    for r in report.rows:
        for k in ("auroc", "aupr_in", "aupr_out", "fpr95"):
            assert 0.0 <= r[k] <= 100.0, r
    assert report.id_logits.shape == (100, 10)
    assert set(report.scores) == set(ALL_SCORES)
    assert all(len(report.scores[s]["gaussian"]) == NUM_OOD and len(report.scores[s]["id"]) == 100
               for s in ALL_SCORES)


def test_balanced_energy_needs_prior(env, pretrained):
    with pytest.raises(ValueError, match="prior"):
        pipe.finetune(pretrained, env["tmp"] / "no-prior", method="balanced-energy", data_root=env["root"],
                      config=cfg())
    assert not (env["tmp"] / "no-prior" / "model.pt").exists()


def test_from_scratch_builds_fresh_model(env, pretrained, monkeypatch):
    built: list[tuple[Any, ...]] = []
    real = classification.build_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(classification, "build_model", spy)
    pipe.finetune(pretrained, env["tmp"] / "ft-again", method="energy-oe", data_root=env["root"], config=cfg())
    assert built == []  # fine-tuning starts from the checkpoint's weights
    path = pipe.finetune(pretrained, env["tmp"] / "scratch", method="energy-oe", data_root=env["root"],
                         config=cfg(), from_scratch=True)
    assert built == [(ARCH, 10)]
    meta = _ckpt(path)["meta"]
    assert meta["stage"] == "scratch" and meta["method"] == "energy-oe"


def test_initial_weights_depend_only_on_the_seed(env):
    """Runs from scratch draw their initialisation from their own seed: what consumed the global RNG before
    (an earlier run in the same process, a resumed or ``--only`` benchmark) must not change it."""
    first = pipe.pretrain_setup(arch=ARCH, data_root=env["root"], seed=3)[2].state_dict()
    torch.rand(1000)
    again = pipe.pretrain_setup(arch=ARCH, data_root=env["root"], seed=3)[2].state_dict()
    other = pipe.pretrain_setup(arch=ARCH, data_root=env["root"], seed=4)[2].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


# ------------------------------------------------------------- fine-tuning never sees ID test data

def test_finetune_reads_only_the_id_train_split(env, pretrained, prior, monkeypatch):
    calls: list[tuple[str, str]] = []
    real = source.load_dataset

    def spy(name: str, root: Any = None, split: str = "test", **kw: Any) -> Any:
        calls.append((name, split))
        return real(name, root, split, **kw)

    monkeypatch.setattr(source, "load_dataset", spy)
    # a checkpoint whose meta names a test split is refused outright: meta keys are a closed schema
    ck = _ckpt(pretrained)
    ck["meta"] = {**ck["meta"], "split": "test", "id_split": "test"}
    tampered = env["tmp"] / "tampered.pt"
    torch.save(ck, tampered)
    with pytest.raises(CheckpointError, match="unknown keys.*id_split"):
        pipe.finetune(tampered, env["tmp"] / "spy-tampered", method="energy-oe", data_root=env["root"], config=cfg())
    for method in ("energy-oe", "balanced-energy+sparsity"):
        pipe.finetune(pretrained, env["tmp"] / f"spy-{method}", method=method, data_root=env["root"],
                      prior=prior if "balanced" in method else None, config=cfg())
    id_calls = [c for c in calls if c[0] == "cifar10"]
    assert id_calls and all(split == "train" for _, split in id_calls), calls
    assert {c for c in calls if c[0] != "cifar10"} == {("tin-aux", "train")}


def test_no_split_parameter_anywhere_in_finetuning():
    assert list(inspect.signature(pipe.id_train_set).parameters) == ["meta", "data_root"]
    params = inspect.signature(pipe.finetune).parameters
    assert not [p for p in params if any(w in p.lower() for w in ("split", "test", "eval", "dataset"))], list(params)
    assert not any(p.kind == p.VAR_KEYWORD for p in params.values())  # nothing can sneak in via **kwargs


# ----------------------------------------------------------------------------------------- long tail

def test_longtailed_meta_rebuilds_lt_counts(env, pretrained_lt):
    meta = read_meta(pretrained_lt)
    expected = longtail_counts(20, 10, 2)
    assert expected[0] == 20 and expected[-1] == 10
    assert meta.imbalance_ratio == 2 and list(meta.class_counts) == expected
    train = pipe.id_train_set(meta, env["root"])
    assert train.class_counts().tolist() == expected


def test_long_tail_accuracy_keys(env, pretrained_lt, pretrained):
    report, meta = pipe.evaluate_checkpoint(pretrained_lt, scores=["energy"], ood=["gaussian"], data_root=env["root"],
                                            device="cpu", num_ood=NUM_OOD)
    labels = load_dataset("cifar10", env["root"], "test").labels
    out = long_tail_accuracy(report.id_logits, labels, meta.class_counts)
    assert set(out) == set(LT_KEYS)
    assert all(0.0 <= v <= 100.0 for v in out.values())
    assert out["acc_all"] == pytest.approx(report.id_metrics["accuracy"])
    assert {k: report.id_metrics[k] for k in LT_KEYS} == out  # the pipeline reports them for long-tailed models
    # balanced training set: no long-tail metrics
    balanced, _ = pipe.evaluate_checkpoint(pretrained, scores=["energy"], ood=["gaussian"], data_root=env["root"],
                                           device="cpu", num_ood=NUM_OOD)
    assert set(balanced.id_metrics) == {"accuracy"}


# ---------------------------------------------------------------------------------------- benchmark

BENCH_TOML = """
[benchmark]
name = "tiny"
id_dataset = "cifar10"
arch = "{arch}"
device = "cpu"
data_root = "{root}"
out = "{out}"
outliers = "tin-aux"
ood_near = ["tin-near"]
ood_far = ["gaussian"]
num_ood = {num_ood}
seeds = [0, 1]
{pretrained}

{training}

[[methods]]
label = "MSP"
method = "msp"

[[methods]]
label = "EnergyOE (tune)"
method = "energy-oe"
m_in = "auto"
m_out = "auto"

[[methods]]
label = "Balanced EnergyOE"
method = "balanced-energy"
gamma = 0.5
"""

EXTRA_METHOD = """
[[methods]]
label = "OE"
method = "oe"
score = "msp"
"""


def _write_config(env: dict[str, Path], name: str, out: Path, extra: str = "", pretrained: Path | None = None,
                  methods: str | None = None) -> Path:
    text = BENCH_TOML.format(arch=ARCH, root=env["root"], out=out, num_ood=NUM_OOD,
                             pretrained=f'pretrained = "{pretrained}"' if pretrained else "",
                             training=TINY_TRAINING_TOML.format(pretrain_epochs=1, finetune_lr=FINETUNE.lr))
    if methods is not None:
        text = text[: text.index("[[methods]]")] + methods
    path = env["tmp"] / f"{name}.toml"
    path.write_text(text + extra)
    return path


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the named pipeline steps fail: the benchmark calls every step through ``oodtune.pipeline``."""
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("must not train / recompute here")
    for n in names:
        monkeypatch.setattr(pipe, n, boom)


@pytest.fixture(scope="module")
def bench(env: dict[str, Path]) -> dict[str, Any]:
    out = env["tmp"] / "bench"
    path = _write_config(env, "bench", out)
    cfg_ = load_benchmark_config(path)
    assert cfg_.seeds == [0, 1] and cfg_.ood_near == ["tin-near"] and cfg_.num_ood == NUM_OOD
    assert cfg_.methods[1].loss_options == {"m_in": "auto", "m_out": "auto"} and cfg_.methods[2].gamma == 0.5
    files = run_benchmark(cfg_, command="test")
    return {"out": out, "config": path, "files": files,
            "results": json.loads((out / "results.json").read_text()), "md": (out / "results.md").read_text()}


def test_benchmark_writes_tables(bench):
    out, res, md = bench["out"], bench["results"], bench["md"]
    assert bench["files"] == [out / "results.json", out / "results.md", out / "results.csv"]
    assert res["oodtune_version"] and res["metric_convention"]["positive_class"] == "OOD"
    assert {r["n"] for r in res["per_set"]} == {NUM_OOD} and "| n |" in md
    rows = {r["method"]: r for r in res["summary"]}
    assert list(rows) == ["MSP", "EnergyOE (tune)", "Balanced EnergyOE"]
    assert rows["MSP"]["runs"] == 1 and isinstance(rows["MSP"]["auroc_all"], float)
    for label in ("EnergyOE (tune)", "Balanced EnergyOE"):
        row = rows[label]
        assert row["runs"] == 2
        for key in ("accuracy", "auroc_all", "auroc_near", "auroc_far", "fpr95_near", "fpr95_far"):
            assert isinstance(row[key], list) and len(row[key]) == 2, (label, key)
        for key in ("fpr95_all", "fpr95_in_all", "fpr95_in_near", "fpr95_in_far"):
            assert isinstance(row[key], list) and len(row[key]) == 2, (label, key)
    assert rows["MSP"]["train_seconds"] is None and "| MSP | 1 |" in md and md.count(" – |") >= 2
    assert "±" in md and "Average over near OOD sets" in md and "Average over far OOD sets" in md
    assert "FPR95↓ OOD+ | FPR95↓ ID+" in md and "## Per seed" in md and "ID is the positive class" in md
    assert "Not run yet" not in md and "missing" not in res
    assert [(r["method"], r["seed"]) for r in res["per_seed"]] == [
        ("MSP", None), ("EnergyOE (tune)", 0), ("EnergyOE (tune)", 1), ("Balanced EnergyOE", 0),
        ("Balanced EnergyOE", 1)]
    for p in ("margins.json", "prior.json", "prior.png", "pretrain/model.pt", "runs/energyoe-tune-s0/model.pt",
              "runs/balanced-energyoe-s1/model.pt", "energy-energyoe-tune.png", "roc-balanced-energyoe.png"):
        assert (out / p).exists(), p
    assert len(list((out / "evals").glob("*/checkpoint.json"))) == 5  # pretrained + 2 rows x 2 seeds


def test_benchmark_aggregates_seed_runs(bench):
    res = bench["results"]
    runs = [r for r in res["per_seed"] if r["method"] == "EnergyOE (tune)"]
    row = next(r for r in res["summary"] if r["method"] == "EnergyOE (tune)")
    by = [{x["dataset"]: x["auroc"] for x in r["rows"]} for r in runs]
    near = [b["tin-near"] for b in by]
    far = [b["gaussian"] for b in by]
    both = [(b["tin-near"] + b["gaussian"]) / 2 for b in by]
    for key, vals in {"auroc_near": near, "auroc_far": far, "auroc_all": both}.items():
        assert row[key] == pytest.approx([np.mean(vals), np.std(vals, ddof=1)]), key
    assert row["accuracy"] == pytest.approx([np.mean([r["accuracy"] for r in runs]),
                                             np.std([r["accuracy"] for r in runs], ddof=1)])
    per = next(r for r in res["per_set"] if r["method"] == "EnergyOE (tune)" and r["dataset"] == "tin-near")
    assert per["group"] == "near" and per["auroc"] == pytest.approx(row["auroc_near"])


def test_benchmark_auto_margins_are_used(bench):
    margins = json.loads((bench["out"] / "margins.json").read_text())
    assert set(margins) == {"m_in", "m_out"} and all(isinstance(v, float) for v in margins.values())
    meta = _ckpt(bench["out"] / "runs" / "energyoe-tune-s1" / "model.pt")["meta"]
    assert meta["loss_options"] == margins and meta["train_config"]["seed"] == 1
    assert meta["train_config"]["batch_size"] == 8 and meta["train_config"]["outlier_batch_size"] == 16
    bal = _ckpt(bench["out"] / "runs" / "balanced-energyoe-s0" / "model.pt")["meta"]
    assert bal["prior"]["gamma"] == 0.5 and bal["loss_options"] == {}


def test_benchmark_resumes_without_retraining(bench, monkeypatch):
    _forbid(monkeypatch, "finetune", "pretrain", "estimate_prior", "propose_margins", "evaluate_checkpoint")
    run_benchmark(load_benchmark_config(bench["config"]), command="test")
    again = json.loads((bench["out"] / "results.json").read_text())
    assert again["summary"] == bench["results"]["summary"]


def test_benchmark_report_only_lists_missing(env, bench, monkeypatch):
    path = _write_config(env, "bench-extra", bench["out"], extra=EXTRA_METHOD)
    _forbid(monkeypatch, "finetune", "pretrain", "estimate_prior", "propose_margins")
    run_benchmark(load_benchmark_config(path), command="test", report_only=True)
    md = (bench["out"] / "results.md").read_text()
    res = json.loads((bench["out"] / "results.json").read_text())
    assert "## Not run yet" in md and "- OE seed 0" in md and "- OE seed 1" in md
    assert res["missing"] == ["OE seed 0", "OE seed 1"]
    assert [r["method"] for r in res["summary"]] == ["MSP", "EnergyOE (tune)", "Balanced EnergyOE"]
    assert not list((bench["out"] / "runs").glob("oe-*"))


def test_benchmark_report_only_with_configured_checkpoint(env, pretrained, monkeypatch):
    """report_only must use ``pretrained = ...`` (not OUT/pretrain) and cope with nothing fine-tuned yet."""
    out = env["tmp"] / "bench-ro"
    path = _write_config(env, "bench-ro", out, pretrained=pretrained,
                         methods='[[methods]]\nlabel = "EnergyOE"\nmethod = "energy-oe"\n')
    _forbid(monkeypatch, "finetune", "pretrain", "estimate_prior", "propose_margins", "evaluate_checkpoint")
    run_benchmark(load_benchmark_config(path), command="test", report_only=True)
    md = (out / "results.md").read_text()
    assert "- EnergyOE seed 0" in md and "- EnergyOE seed 1" in md
    assert not (out / "evals").exists()  # nothing evaluated either
    assert not (out / "pretrain").exists()


def test_benchmark_only_runs_named_rows_and_tabulates_the_rest(env, bench, monkeypatch):
    cfg_ = load_benchmark_config(bench["config"], only=["balanced-energyoe", "MSP"])
    assert [m.label for m in cfg_.methods if cfg_.selected(m)] == ["MSP", "Balanced EnergyOE"]
    with pytest.raises(ValueError, match=r"--only sparsity: .* no such row.*energyoe-tune"):
        load_benchmark_config(bench["config"], only=["sparsity"])
    # OE is in the config but not selected: it must be listed as missing, not trained; the finished rows
    # (selected or not) all stay in the table.
    path = _write_config(env, "bench-only", bench["out"], extra=EXTRA_METHOD)
    _forbid(monkeypatch, "finetune", "pretrain", "estimate_prior", "propose_margins", "evaluate_checkpoint")
    run_benchmark(load_benchmark_config(path, only=["msp"]), command="test")
    res = json.loads((bench["out"] / "results.json").read_text())
    assert [r["method"] for r in res["summary"]] == ["MSP", "EnergyOE (tune)", "Balanced EnergyOE"]
    assert res["missing"] == ["OE seed 0", "OE seed 1"]
    assert not list((bench["out"] / "runs").glob("oe-*"))


def test_benchmark_seed_runs_only_its_seeds_beside_another_process(env, pretrained, monkeypatch):
    """--seed: a process fine-tunes only its seeds (the others are listed as missing), shares the output folder
    with a process running another seed, and leaves post-hoc rows to the process that runs the first seed."""
    out = env["tmp"] / "bench-seed"
    path = _write_config(env, "bench-seed", out, pretrained=pretrained,
                         methods='[[methods]]\nlabel = "MSP"\nmethod = "msp"\n' + EXTRA_METHOD)
    cfg_ = load_benchmark_config(path, only_seeds=[1])
    msp, oe = cfg_.methods
    assert cfg_.partial and cfg_.selected(oe) and cfg_.selected(oe, 1) and not cfg_.selected(oe, 0)
    assert not cfg_.selected(msp) and load_benchmark_config(path, only_seeds=[0, 1]).selected(msp)
    with pytest.raises(ValueError, match=r"--seed 5: not in \[benchmark\].seeds \[0, 1\]"):
        load_benchmark_config(path, only_seeds=[1, 5])
    trained: list[int] = []
    real = pipe.finetune

    def finetune(*a: Any, config: Any, **k: Any) -> Any:
        trained.append(config.seed)
        return real(*a, config=config, **k)

    monkeypatch.setattr(pipe, "finetune", finetune)
    with lock_held_elsewhere(out, shared=True):  # another --only / --seed process at work in the same folder
        run_benchmark(cfg_, command="test")
    res = json.loads((out / "results.json").read_text())
    assert trained == [1] and (out / "runs" / "oe-s1" / "model.pt").exists()
    assert not (out / "runs" / "oe-s0").exists()
    assert res["missing"] == ["OE seed 0"] and [r["method"] for r in res["summary"]] == ["MSP", "OE"]
