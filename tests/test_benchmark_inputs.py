"""A finished benchmark folder and changed inputs: what is missing is computed exactly, a changed training setting is
refused before any work, and cached values are keyed by their inputs (tiny CPU runs, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import oodtune.benchmark.grid as grid
import oodtune.pipeline as pipe
from fixtures_data import TINY_TRAINING_TOML, offline_env
from oodtune.benchmark import load_benchmark_config, run_benchmark
from oodtune.benchmark.store import EvalStore, dataset_key, score_key
from oodtune.errors import ConfigError
from oodtune.metrics import roc_curve
from oodtune.scores import build_score

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

TOML = """
[benchmark]
name = "inputs"
arch = "wrn-10-1"
data_root = "{root}"
device = "cpu"
outliers = "tin-aux"
ood_near = ["tin-near"]
ood_far = {far}
num_ood = {num_ood}
seeds = [0]
out = "{out}"

{training}

[[methods]]
label = "MSP"
method = "msp"

[[methods]]
label = "OE"
method = "oe"
score = "msp"

[[methods]]
label = "EnergyOE"
method = "energy-oe"
m_in = "auto"
m_out = "auto"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("inputs"), train_per_class=10, test_per_class=4) as e:
        yield e


def config(env: dict[str, Path], out: Path, *, far: str = '["gaussian"]', num_ood: int = 8, epochs: int = 1,
           lr: float = 0.001, extra: str = "", only: list[str] | None = None) -> Any:
    path = out.parent / f"{out.name}-{abs(hash((far, num_ood, epochs, lr, extra)))}.toml"
    path.write_text(TOML.format(root=env["root"], out=out, far=far, num_ood=num_ood,
                                training=TINY_TRAINING_TOML.format(pretrain_epochs=epochs, finetune_lr=lr)) + extra)
    return load_benchmark_config(path, only=only)


@pytest.fixture(scope="module")
def finished(env: dict[str, Path]) -> Path:
    out = env["tmp"] / "bench"
    run_benchmark(config(env, out), command="test")
    return out


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, ...], tuple[str, ...], int | None]]:
    """Record every evaluation (checkpoint folder, scores, OOD sets, size); forbid any training."""
    log: list[tuple[str, tuple[str, ...], tuple[str, ...], int | None]] = []
    real = pipe.evaluate_checkpoint

    def recording(ckpt: Any, **kw: Any) -> Any:
        log.append((Path(ckpt).parent.name, tuple(kw["scores"]), tuple(kw["ood"]), kw["num_ood"]))
        return real(ckpt, **kw)

    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("must not train here")

    monkeypatch.setattr(pipe, "evaluate_checkpoint", recording)
    for name in ("pretrain", "finetune", "estimate_prior", "propose_margins"):
        monkeypatch.setattr(pipe, name, boom)
    return log


def copy_of(finished: Path, tmp: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(finished, out)
    return out


def results(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "results.json").read_text()))


def test_rerun_computes_nothing(env, finished, calls):
    before = results(finished)
    run_benchmark(config(env, finished), command="test")
    assert calls == [] and results(finished)["summary"] == before["summary"]


def test_adding_an_ood_set_computes_exactly_that_set(env, finished, calls):
    out = copy_of(finished, env["tmp"], "add-set")
    run_benchmark(config(env, out, far='["gaussian", "uniform"]'), command="test")
    # the pretrained model once (energy for the plots + msp for MSP/OE), each fine-tuned run once: only "uniform"
    assert sorted(calls) == sorted([("pretrain", ("energy", "msp"), ("uniform",), 8),
                                    ("oe-s0", ("msp", "energy"), ("uniform",), 8),
                                    ("energyoe-s0", ("energy",), ("uniform",), 8)])
    res = results(out)
    assert {r["dataset"] for r in res["per_set"]} == {"tin-near", "gaussian", "uniform"}
    old = {(r["method"], r["dataset"]): r for r in results(finished)["per_set"]}
    for r in res["per_set"]:  # the cached sets keep their values
        if r["dataset"] != "uniform":
            assert r == old[(r["method"], r["dataset"])]


def test_adding_a_score_row_computes_only_that_score(env, finished, calls):
    out = copy_of(finished, env["tmp"], "add-score")
    run_benchmark(config(env, out, extra='\n[[methods]]\nlabel = "Entropy"\nmethod = "entropy"\n'), command="test")
    assert calls == [("pretrain", ("entropy",), ("tin-near", "gaussian"), 8)]
    assert [r["method"] for r in results(out)["summary"]] == ["MSP", "OE", "EnergyOE", "Entropy"]


def test_another_ood_size_is_another_input(env, finished, calls):
    out = copy_of(finished, env["tmp"], "size")
    run_benchmark(config(env, out, num_ood=5), command="test")
    assert {c[3] for c in calls} == {5} and len(calls) == 3


def test_changed_pretraining_is_refused_before_any_work(env, finished, calls):
    before = (finished / "results.md").read_text()
    with pytest.raises(ConfigError, match=r"pretrain/model.pt was trained with other settings.*epochs: 1 -> 2"):
        run_benchmark(config(env, finished, epochs=2), command="test")
    assert calls == [] and (finished / "results.md").read_text() == before


def test_changed_finetuning_is_refused_and_names_the_run(env, finished, calls):
    with pytest.raises(ConfigError, match=r"runs/oe-s0/model.pt was trained .*lr: 0.001 -> 0.002.*delete"):
        run_benchmark(config(env, finished, lr=0.002), command="test")
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.002"):
        run_benchmark(config(env, finished, lr=0.002), command="test", report_only=True)
    assert calls == []


def test_runs_from_another_pretrained_checkpoint_are_refused(env, finished, calls):
    """Same path, other content: the fine-tuned runs recorded the SHA-256 of the checkpoint they started from."""
    out = copy_of(finished, env["tmp"], "swapped")
    ckpt = out / "pretrain" / "model.pt"
    data = torch.load(ckpt, weights_only=True)
    data["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in data["model"].items()}
    torch.save(data, ckpt)
    with pytest.raises(ConfigError, match=r"pretrained checkpoint \(SHA-256\)"):
        run_benchmark(config(env, out), command="test")


def test_roc_plot_uses_the_rows_score(env, finished, monkeypatch):
    """OE is tabulated with MSP: its ROC curves must be MSP's too, for the pretrained and the fine-tuned model."""
    drawn: dict[str, Any] = {}
    monkeypatch.setattr(grid, "plot_roc_curves", lambda path, curves, **kw: drawn.setdefault(Path(path).name, curves))
    bench = grid.Benchmark(config(env, finished))
    bench.run("test")
    ckpts = {"pretrained": bench.trained(bench.pretrained_path()),
             "OE": bench.trained(bench.run_dir(bench.cfg.methods[1], 0) / "model.pt")}
    for (model, name), (fpr, tpr, *_) in drawn["roc-oe.png"].items():
        ev = bench.evaluate(ckpts[model], ["msp"], compute=False)
        assert ev is not None
        ref_fpr, ref_tpr, _ = roc_curve(ev.scores["msp"]["id"], ev.scores["msp"][name])
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
    assert {k[1] for k in drawn["roc-oe.png"]} == {"tin-near", "gaussian"}


def test_deleted_weights_keep_their_results_and_are_not_retrained(env, finished, calls):
    """Fine-tuned weights may be deleted to save space (the GPU scripts ship none back): the run's run.json (hash
    and metadata) keeps it in the table; what it cannot compute any more is listed, never retrained."""
    out = copy_of(finished, env["tmp"], "no-weights")
    for final in (out / "runs").glob("*/model.pt"):
        final.unlink()
    run_benchmark(config(env, out), command="test")
    assert calls == [] and results(out)["summary"] == results(finished)["summary"]
    run_benchmark(config(env, out, far='["gaussian", "uniform"]'), command="test")
    assert [c[0] for c in calls] == ["pretrain"]  # only the pretrained model still has weights to evaluate
    assert results(out)["missing"] == ["OE seed 0 (trained, not evaluated)", "EnergyOE seed 0 (trained, not evaluated)"]
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.002"):  # still checked against the config
        run_benchmark(config(env, out, lr=0.002), command="test")


def test_cache_keys_follow_the_inputs():
    assert score_key(build_score("odin")) != score_key(build_score("odin", std=(0.25, 0.25, 0.25)))
    assert score_key(build_score("odin", std=(0.25, 0.25, 0.25))) == score_key(build_score("odin", std=[0.25] * 3))
    assert score_key(build_score("energy")) != score_key(build_score("energy", temperature=2.0))
    assert dataset_key("mnist", None) == "mnist-nall" and dataset_key("mnist", 100) == "mnist-n100"
    a, b = dataset_key("folder:/data/a/set", 5), dataset_key("folder:/data/b/set", 5)
    assert a != b and "/" not in a


def test_metrics_against_another_id_split_are_other_files(tmp_path: Path) -> None:
    """Rows, ID scores and ID metrics depend on the ID split; the raw OOD scores do not."""
    test, val = EvalStore(tmp_path), EvalStore(tmp_path, id_split="val")
    scores = tmp_path / "energy-x" / "dtd-n1000.npy"
    assert test.row_path(scores).name == "dtd-n1000.json" and val.row_path(scores).name == "dtd-n1000-val.json"
    assert (test.id_file, test.info_file) == ("id", "checkpoint.json")
    assert (val.id_file, val.info_file) == ("id-val", "checkpoint-val.json")
    blurred = EvalStore(tmp_path, id_split="val", blur=True)  # blurred maps: their own OOD samples, same row names
    assert blurred.row_path(scores.with_name("dtd-n1000-blur.npy")).name == "dtd-n1000-val-blur.json"
    assert EvalStore.inliers_path(scores).name == "dtd-n1000-inliers.npy"


def test_a_cache_file_another_process_wrote_first_is_kept(tmp_path: Path) -> None:
    """Two --only processes evaluating one checkpoint at once: the second write finds the first's file (the same
    value, content-addressed) and keeps it instead of failing."""
    store = EvalStore(tmp_path)
    sha = "ab" * 32

    def raced() -> dict[str, Any]:
        store.folder(sha).mkdir(parents=True)
        (store.folder(sha) / "margins-x.json").write_text(json.dumps({"m_in": -7.0}))  # the other process
        return {"m_in": -7.0}

    assert store.derived(sha, "margins-x", raced) == {"m_in": -7.0}
    assert store.derived(sha, "margins-x", None) == {"m_in": -7.0}


def test_only_and_report_only_processes_share_the_folder_and_see_runs_finished_meanwhile(env, finished, calls,
                                                                                        monkeypatch):
    """An --only process trains its rows before it tabulates, so a run another process finished meanwhile is in its
    table; --only and --report-only take the folder's lock shared (a run of every row, exclusively)."""
    out = copy_of(finished, env["tmp"], "shared")
    shutil.rmtree(out / "runs" / "oe-s0")  # the OE row is "still running" in another process
    taken: list[bool] = []
    real_lock = grid.output_lock

    def lock(folder: Any, *, shared: bool = False) -> Any:
        taken.append(shared)
        return real_lock(folder, shared=shared)

    def meanwhile(*_a: Any, **_k: Any) -> None:  # training EnergyOE here, the other process finishes OE
        shutil.copytree(finished / "runs" / "oe-s0", out / "runs" / "oe-s0")
        shutil.copytree(finished / "runs" / "energyoe-s0", out / "runs" / "energyoe-s0")

    shutil.rmtree(out / "runs" / "energyoe-s0")
    monkeypatch.setattr(grid, "output_lock", lock)
    monkeypatch.setattr(pipe, "finetune", meanwhile)
    run_benchmark(config(env, out, only=["energyoe"]), command="test")
    assert "missing" not in results(out)  # OE, finished during this process's training, is tabulated
    run_benchmark(config(env, out), command="test", report_only=True)
    run_benchmark(config(env, out), command="test")
    assert taken == [True, True, False]
