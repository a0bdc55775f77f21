"""The score × model matrix of the benchmark, and leak-free selection through the real pipeline, on a tiny offline
data root (WRN-10-1, 1-2 steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import oodtune.benchmark.matrix as matrix_module
import oodtune.pipeline as pipe
import oodtune.pipeline.classification as classification
from fixtures_data import offline_env
from helpers_cli import fails, ok
from oodtune.benchmark import load_benchmark_config, run_benchmark
from oodtune.evaluation.classification import compute_outputs
from oodtune.models import load_feature_model
from oodtune.scores import KNN, build_score

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

NUM_OOD = 16
SCORES = ["msp", "energy", "knn", "react+energy", "vim"]

CONFIG = """
pretrain = {{ epochs = 1, batch_size = 8, max_steps_per_epoch = 2, lr = 0.01 }}
finetune = {{ epochs = 1, batch_size = 8, outlier_batch_size = 16, max_steps_per_epoch = 1 }}
methods = [{{ label = "EnergyOE", method = "energy-oe" }}]

[benchmark]
name = "tiny matrix"
arch = "wrn-10-1"
device = "cpu"
data_root = "{root}"
out = "{out}"
ood_near = ["tin-near"]
ood_far = ["gaussian"]
num_ood = {num_ood}
seeds = [0, 1]

[matrix]
{matrix}
"""
MATRIX = f'scores = {json.dumps(SCORES)}\nvalidation_outliers = "tin-aux-val"\nid_holdout = 30\n'


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("matrix"), train_per_class=10, test_per_class=5) as e:
        yield e


def _config(env: dict[str, Path], name: str, matrix: str = MATRIX) -> Path:
    path = env["tmp"] / f"{name}.toml"
    path.write_text(CONFIG.format(root=env["root"], out=env["tmp"] / "bench", num_ood=NUM_OOD, matrix=matrix))
    return path


@pytest.fixture(scope="module")
def bench(env: dict[str, Path]) -> dict[str, Any]:
    cfg = load_benchmark_config(_config(env, "matrix"))
    assert cfg.matrix is not None and cfg.matrix.modes == ("selected", "default")
    files = run_benchmark(cfg, command="test")
    out = env["tmp"] / "bench"
    return {"out": out, "files": files, "json": json.loads((out / "matrix.json").read_text()),
            "md": (out / "matrix.md").read_text()}


def test_matrix_covers_every_score_on_every_model(bench):
    out, res, md = bench["out"], bench["json"], bench["md"]
    assert bench["files"][-2:] == [out / "matrix.json", out / "matrix.md"]
    records = res["records"]
    assert [(r["model"], r["seed"]) for r in records] == [("Pretrained (no fine-tuning)", None), ("EnergyOE", 0),
                                                          ("EnergyOE", 1)]
    pairs = [(s, d) for s in SCORES for d in ("tin-near", "gaussian")]
    for r in records:  # one evaluation per model gives both modes
        assert [(x["score"], x["dataset"]) for x in r["rows"]] == pairs
        assert [(x["score"], x["dataset"]) for x in r["default_rows"]] == pairs
        assert set(r["selections"]) == set(SCORES) and r["selected"]
        for score in SCORES:  # a score whose default won has identical rows in both modes
            sel = r["selections"][score]
            same = [x for x in r["rows"] if x["score"] == score] == [x for x in r["default_rows"]
                                                                     if x["score"] == score]
            assert same or sel["chosen"] != sel["default"]
    summary = res["summary"]["selected"]
    assert summary["runs"] == {"Pretrained (no fine-tuning)": 1, "EnergyOE": 2}
    tuned = [r for r in records if r["model"] == "EnergyOE"]
    per_seed = [np.mean([x["auroc"] for x in r["rows"] if x["score"] == "knn"]) for r in tuned]
    assert summary["all"]["auroc"]["EnergyOE"]["knn"] == pytest.approx([np.mean(per_seed), np.std(per_seed, ddof=1)])
    near = [next(x["fpr95"] for x in r["rows"] if x["score"] == "vim" and x["dataset"] == "tin-near") for r in tuned]
    assert summary["near"]["fpr95"]["EnergyOE"]["vim"] == pytest.approx([np.mean(near), np.std(near, ddof=1)])
    for heading in ("## Hyperparameters selected on the validation pair", "## Paper-default hyperparameters",
                    "### AUROC↑, average over all OOD sets", "### FPR95↓, average over near OOD sets",
                    "### Chosen hyperparameters", "### AUROC↑ change from the pretrained model (same score)",
                    "### FPR95↓ of each score minus energy's on the same model"):
        assert heading in md
    assert md.count("**") >= 2 * 3 * 8  # one bold (best) cell per table row


def test_default_mode_keeps_paper_values_and_selected_mode_records_its_choice(bench):
    default = bench["json"]["summary"]["default"]["all"]["auroc"]
    for r in bench["json"]["records"]:
        if r["seed"] is None:  # the default table reads the default rows
            pretrained_knn = np.mean([x["auroc"] for x in r["default_rows"] if x["score"] == "knn"])
            assert default["Pretrained (no fine-tuning)"]["knn"] == pytest.approx(pretrained_knn)
        if r["selected"]:
            knn = r["selections"]["knn"]
            assert knn["default"] == {"k": 50} and knn["chosen"]["k"] in KNN.grid["k"]
            best = max((t for t in knn["tried"] if "auroc" in t), key=lambda t: t["auroc"])  # first of the best
            assert knn["chosen"] == {"k": best["k"]} and "AUROC" in knn["rule"]
            assert r["selections"]["msp"]["tried"] == []
            assert r["selections"]["vim"]["default"] == {"dim": 32}  # WRN-10-1: 64 features


def test_matrix_resumes_and_never_reuses_a_different_question(env, bench, monkeypatch):
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("must not recompute")
    for name in ("finetune", "pretrain", "estimate_prior", "propose_margins", "evaluate_checkpoint"):
        monkeypatch.setattr(pipe, name, boom)
    run_benchmark(load_benchmark_config(_config(env, "matrix")), command="test")
    assert json.loads((bench["out"] / "matrix.json").read_text())["summary"] == bench["json"]["summary"]
    before = set((bench["out"] / "matrix").iterdir())
    other = MATRIX.replace("id_holdout = 30", "id_holdout = 20") + 'hyperparameters = ["selected"]\n'
    cfg = load_benchmark_config(_config(env, "matrix-other", other), only=["energyoe"])
    with pytest.raises(AssertionError, match="must not recompute"):  # another hold-out is another question
        run_benchmark(cfg, command="test")
    assert set((bench["out"] / "matrix").iterdir()) == before  # nothing overwritten
    run_benchmark(load_benchmark_config(_config(env, "matrix-ro", other)), command="test", report_only=True)
    md = (bench["out"] / "matrix.md").read_text()
    assert "## Not run yet" in md and "- EnergyOE seed 1" in md


@pytest.mark.parametrize(("matrix", "match"), [
    (MATRIX.replace("tin-aux-val", "tin-near"), "OOD test set of this benchmark"),
    (MATRIX.replace('"msp"', '"gradnorm"'), "distinct score names"),
    (MATRIX + 'hyperparameters = ["tuned"]\n', "selected and/or default"),
    ('scores = ["knn"]\n', "need validation_outliers"),
    (MATRIX.replace("id_holdout = 30", "id_holdout = 0"), "must be >= 1"),
    (MATRIX + "foo = 1\n", "unknown key 'foo'"),
])
def test_matrix_config_is_checked(env, matrix, match):
    with pytest.raises(ValueError, match=match):
        load_benchmark_config(_config(env, "bad", matrix))


def test_difference_tables():
    table = {"Pretrained (no fine-tuning)": {"energy": 60.0, "knn": 70.0},
             "EnergyOE": {"energy": (75.0, 1.0), "knn": (72.5, 2.0)}}
    assert matrix_module._difference_rows(table, "Pretrained (no fine-tuning)") == [
        {"model": "EnergyOE", "energy": "+15.00", "knn": "+2.50"}]
    assert matrix_module._difference_rows(table, "energy") == [
        {"model": "Pretrained (no fine-tuning)", "energy": "+0.00", "knn": "+10.00"},
        {"model": "EnergyOE", "energy": "+0.00", "knn": "-2.50"}]


def test_default_only_records_hold_default_rows():
    record = {"selected": False, "rows": [{"score": "knn"}], "default_rows": []}
    assert matrix_module._rows(record, "default") == record["rows"]
    selecting = {"selected": True, "rows": [{"score": "knn", "v": 1}], "default_rows": [{"score": "knn", "v": 2}]}
    assert matrix_module._rows(selecting, "default") == selecting["default_rows"]
    assert matrix_module._rows(selecting, "selected") == selecting["rows"]


# ----------------------------------------------------------------------------- through the real pipeline


class SpyKNN(KNN):
    fits: ClassVar[list[torch.Tensor]] = []

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None = None) -> SpyKNN:
        SpyKNN.fits.append(features.clone())
        return super().fit(logits, features, labels)


def test_pipeline_fits_only_on_the_checkpoints_train_split(env, bench, monkeypatch):
    ckpt = bench["out"] / "runs" / "energyoe-s0" / "model.pt"
    monkeypatch.setattr(classification, "build_score",
                        lambda name: SpyKNN(k=3) if name == "knn" else build_score(name))
    SpyKNN.fits.clear()
    spec = pipe.ValidationSpec(outliers="tin-aux-val", id_holdout=30, seed=7)
    report, meta = pipe.evaluate_checkpoint(ckpt, scores=["knn"], ood=["gaussian"], data_root=env["root"],
                                            device="cpu", num_ood=NUM_OOD, validation=spec)
    net, _ = load_feature_model(ckpt)
    train = pipe.id_train_set(meta, env["root"])
    feats = compute_outputs(net, train, pipe.normalizer_for(meta), device="cpu").features
    holdout = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))[:30]
    kept = torch.from_numpy(np.setdiff1d(np.arange(len(train)), holdout.numpy()))
    sel = report.selections["knn"]
    tried = len(sel["tried"])
    assert len(SpyKNN.fits) == tried + 1 + (sel["chosen"] != sel["default"])  # + the default, for default_rows
    assert all(torch.allclose(f, feats[kept]) for f in SpyKNN.fits[:tried])
    assert all(torch.allclose(f, feats) for f in SpyKNN.fits[tried:])


def test_validation_outliers_may_not_be_a_test_set(env, bench):
    ckpt = bench["out"] / "runs" / "energyoe-s0" / "model.pt"
    with pytest.raises(ValueError, match="also an OOD test set"):
        pipe.evaluate_checkpoint(ckpt, scores=["knn"], ood=["tin-near", "gaussian"], data_root=env["root"],
                                 device="cpu", num_ood=NUM_OOD,
                                 validation=pipe.ValidationSpec(outliers="tin-near", id_holdout=10))
    with pytest.raises(ValueError, match="id_holdout must be between 1 and 99"):
        pipe.evaluate_checkpoint(ckpt, scores=["knn"], ood=["gaussian"], data_root=env["root"], device="cpu",
                                 num_ood=NUM_OOD, validation=pipe.ValidationSpec(outliers="tin-aux-val",
                                                                                 id_holdout=100))



def test_cli_evaluate_selects_on_a_validation_pair(env, bench):
    ckpt = bench["out"] / "runs" / "energyoe-s0" / "model.pt"
    out = env["tmp"] / "cli-eval"
    res = ok("evaluate", ckpt, "--score", "knn", "--score", "msp", "--ood", "gaussian", "--num-ood", str(NUM_OOD),
             "--select-on", "tin-aux-val", "--id-holdout", "20", "--data-root", env["root"], "--device", "cpu",
             "--out", out)
    assert "knn: chose {'k': " in res.output and "(paper default {'k': 50})" in res.output
    saved = json.loads((env["tmp"] / "cli-eval.json").read_text())
    assert saved["selections"]["knn"]["default"] == {"k": 50} and saved["selections"]["msp"]["tried"] == []
    fails("evaluate", ckpt, "--score", "knn", "--ood", "tin-near", "--select-on", "tin-near", "--data-root",
          env["root"], "--device", "cpu", match="also an OOD test set", code=1)
