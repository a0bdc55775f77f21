"""Nested seeds (one pretrained model per pretrain seed, every row x fine-tuning seed under it) and the
comparisons' paired differences with hierarchical bootstrap CIs, through the real grid on a tiny offline data root
(WRN-10-1, 1-2 steps)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import oodtune.pipeline as pipe
from fixtures_data import offline_env
from helpers_lock import lock_held_elsewhere
from oodtune.benchmark import load_benchmark_config, run_nested
from oodtune.errors import ConfigError
from oodtune.metrics.bootstrap import VERDICTS

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

CONFIG = """
pretrain = {{ epochs = 1, batch_size = 8, max_steps_per_epoch = 2, lr = 0.01 }}
finetune = {{ epochs = 1, batch_size = 8, outlier_batch_size = 16, max_steps_per_epoch = 1 }}
methods = [{{ label = "MSP", method = "msp" }}, {{ label = "EnergyOE", method = "energy-oe" }},
           {{ label = "OE", method = "oe", score = "msp" }}]
comparisons = [{{ better = "EnergyOE", than = "OE" }}, {{ better = "OE", than = "MSP", label = "OE vs post-hoc" }}]

[benchmark]
name = "tiny nested"
arch = "wrn-10-1"
device = "cpu"
data_root = "{root}"
out = "{out}"
ood_near = ["tin-near"]
ood_far = ["gaussian", "uniform"]
num_ood = 16
seeds = {seeds}
pretrain_seeds = [0, 1]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("nested"), train_per_class=5, test_per_class=4) as e:
        yield e


def _config(env: dict[str, Path], name: str, seeds: str = "[0, 1]") -> Path:
    path = env["tmp"] / f"{name}.toml"
    path.write_text(CONFIG.format(root=env["root"], out=env["tmp"] / "bench", seeds=seeds))
    return path


@pytest.fixture(scope="module")
def nested(env: dict[str, Path]) -> dict[str, Any]:
    cfg = load_benchmark_config(_config(env, "nested"))
    files = run_nested(cfg, "test", n_boot=60)
    out = env["tmp"] / "bench"
    return {"out": out, "files": files, "cmp": json.loads((out / "comparisons.json").read_text())}


def test_each_pretrain_seed_is_its_own_pretrained_model(nested):
    records = [json.loads((nested["out"] / f"pretrain-s{p}" / "pretrain" / "run.json").read_text()) for p in (0, 1)]
    assert records[0]["sha256"] != records[1]["sha256"]
    assert [r["meta"]["train_config"]["seed"] for r in records] == [0, 1]
    for p in (0, 1):
        for row in ("energyoe", "oe"):
            for s in (0, 1):
                assert (nested["out"] / f"pretrain-s{p}" / "runs" / f"{row}-s{s}" / "run.json").exists()


def test_comparisons_cover_every_claim_group_and_metric(nested):
    rows = nested["cmp"]["rows"]
    sets = ("tin-near", "gaussian", "uniform")
    assert {(r["comparison"], r["group"], r["metric"], r["scope"]) for r in rows} == {
        (c, g, m, "set" if g in sets else "group") for c in ("EnergyOE vs OE", "OE vs post-hoc")
        for g in ("all", "near", "far", *sets) for m in ("auroc", "aupr_out", "fpr95", "fpr95_in")}
    for c in ("EnergyOE vs OE", "OE vs post-hoc"):  # a group's difference is the mean of its sets' differences
        diff = {(r["group"], r["metric"]): r["difference"] for r in rows if r["comparison"] == c}
        for m in ("auroc", "fpr95"):
            assert diff[("far", m)] == pytest.approx((diff[("gaussian", m)] + diff[("uniform", m)]) / 2)
            assert diff[("near", m)] == pytest.approx(diff[("tin-near", m)])
    assert all(r["verdict"] in VERDICTS and r["low"] <= r["high"] for r in rows)
    assert all(r["models"] == 2 and r["cells"] == 4 for r in rows)  # the post-hoc row joins every seed
    assert nested["cmp"]["pending"] == []
    for name in ("comparisons.md", "forest.png", "results.md", "results.json"):
        assert (nested["out"] / name).exists(), name
    md = (nested["out"] / "comparisons.md").read_text()
    assert "established" in md and "FPR95 ID+" in md and "AUPR-Out" in md and "## Per OOD set" in md


def test_difference_is_the_mean_over_models_of_the_mean_over_seeds_of_the_stored_rows(nested):
    """Independent of the bootstrap code: from each sub-benchmark's results.json per-seed averages."""
    by_model = []
    for p in (0, 1):
        data = json.loads((nested["out"] / f"pretrain-s{p}" / "results.json").read_text())
        runs = {(r["method"], r["seed"]): r for r in data["per_seed"]}
        by_model.append(np.mean([runs[("EnergyOE", s)]["auroc_all"] - runs[("OE", s)]["auroc_all"] for s in (0, 1)]))
    got = next(r for r in nested["cmp"]["rows"]
               if (r["comparison"], r["group"], r["metric"]) == ("EnergyOE vs OE", "all", "auroc"))
    assert got["difference"] == pytest.approx(np.mean(by_model), abs=1e-6)


def test_resume_trains_nothing_and_gives_the_same_intervals(env, nested, monkeypatch):
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a finished piece was computed again")
    monkeypatch.setattr(pipe, "pretrain", boom)
    monkeypatch.setattr(pipe, "finetune", boom)
    monkeypatch.setattr(pipe, "evaluate_checkpoint", boom)
    run_nested(load_benchmark_config(_config(env, "nested")), "test", n_boot=60)
    again = json.loads((nested["out"] / "comparisons.json").read_text())
    assert again["rows"] == nested["cmp"]["rows"]


def test_a_partial_design_names_its_pending_runs_and_compares_what_finished(env, nested):
    run_nested(load_benchmark_config(_config(env, "partial", seeds="[0, 1, 2]")), "test", report_only=True, n_boot=20)
    data = json.loads((nested["out"] / "comparisons.json").read_text())
    assert sorted(data["pending"]) == sorted(f"{row} (pretrained model s{p}, seed 2): not trained"
                                             for row in ("EnergyOE", "OE") for p in (0, 1))
    assert all(r["cells"] == 4 for r in data["rows"])
    assert "## Runs pending" in (nested["out"] / "comparisons.md").read_text()
    assert "## Not run yet" in (nested["out"] / "results.md").read_text()
    run_nested(load_benchmark_config(_config(env, "nested")), "test", report_only=True, n_boot=60)  # restore


def test_report_only_writes_the_comparisons_beside_processes_still_training(env, nested):
    """--report-only while --only / --seed processes hold the folder (shared) writes the comparisons; a run of the
    whole grid holding it (exclusive) still keeps it out."""
    from oodtune.errors import OutputInUseError

    out, cfg = nested["out"], load_benchmark_config(_config(env, "nested"))
    (out / "comparisons.json").unlink()
    with lock_held_elsewhere(out, shared=True):
        run_nested(cfg, "test", report_only=True, n_boot=60)
    assert json.loads((out / "comparisons.json").read_text())["rows"] == nested["cmp"]["rows"]
    with lock_held_elsewhere(out, shared=False), pytest.raises(OutputInUseError, match="in use"):
        run_nested(cfg, "test", report_only=True, n_boot=60)


@pytest.mark.parametrize(("edit", "match"), [
    (("pretrain_seeds = [0, 1]", "pretrain_seeds = [0, 0]"), "distinct integers"),
    (("pretrain_seeds = [0, 1]", "pretrain_seeds = [0, 1]\npretrained = \"x.pt\""), "cannot be combined"),
    (("lr = 0.01 }", "lr = 0.01, seed = 3 }"), r"remove \[pretrain\].seed"),
    (('than = "OE" }', 'than = "Energy OE" }'), r"\[\[comparisons\]\] #1.than: expected the label"),
    (('than = "OE" }', 'than = "EnergyOE" }'), "with itself"),
])
def test_nested_config_is_checked(env, edit, match):
    path = _config(env, "bad")
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(ConfigError, match=match) as info:
        load_benchmark_config(path)
    assert re.search(re.escape(str(path)), str(info.value))


def test_one_process_per_pretrained_model(env, nested, monkeypatch):
    """--pretrain-seed: a process runs only its models' grids (the other models' runs are only read)."""
    visited: list[Path] = []
    real = run_nested.__globals__["run_benchmark"]

    def spy(sub: Any, *args: Any, **kwargs: Any) -> Any:
        visited.append(sub.out)
        return real(sub, *args, **kwargs)
    monkeypatch.setitem(run_nested.__globals__, "run_benchmark", spy)
    cfg = load_benchmark_config(_config(env, "nested"))
    run_nested(cfg, "test", report_only=True, n_boot=60, models=[1])
    assert visited == [nested["out"] / "pretrain-s1"]
    assert json.loads((nested["out"] / "comparisons.json").read_text())["rows"] == nested["cmp"]["rows"]
    with pytest.raises(ConfigError, match="not in \\[benchmark\\].pretrain_seeds"):
        run_nested(cfg, "test", report_only=True, models=[7])


def test_a_pretrain_seed_process_leaves_the_comparisons_to_the_one_writing_them(env, nested, monkeypatch, caplog):
    """Two --pretrain-seed processes: the one that finds the benchmark folder locked by the other keeps its stored
    runs and says to run --report-only, instead of failing; without --pretrain-seed the lock still refuses."""
    from contextlib import contextmanager

    from oodtune.errors import OutputInUseError

    @contextmanager
    def in_use(folder: Any, shared: bool = False) -> Any:
        raise OutputInUseError(f"{folder} is in use by PID 1")
        yield  # pragma: no cover

    monkeypatch.setitem(run_nested.__globals__, "output_lock", in_use)
    cfg = load_benchmark_config(_config(env, "nested"))
    before = (nested["out"] / "comparisons.json").read_text()
    with caplog.at_level("WARNING"):
        run_nested(cfg, "test", report_only=True, n_boot=20, models=[1])
    assert "--report-only" in caplog.text and "s1" in caplog.text
    assert (nested["out"] / "comparisons.json").read_text() == before
    with pytest.raises(OutputInUseError, match="in use"):
        run_nested(cfg, "test", report_only=True, n_boot=20)
    only = load_benchmark_config(_config(env, "nested"), only=[cfg.methods[0].label])
    caplog.clear()
    with caplog.at_level("WARNING"):  # an --only process: the same, its rows are stored
        run_nested(only, "test", report_only=True, n_boot=20)
    assert "--report-only" in caplog.text and cfg.methods[0].label in caplog.text
    caplog.clear()
    seed = load_benchmark_config(_config(env, "nested"), only_seeds=[cfg.seeds[-1]])
    with caplog.at_level("WARNING"):  # a --seed process: the same
        run_nested(seed, "test", report_only=True, n_boot=20)
    assert "--report-only" in caplog.text and f"seed(s) {cfg.seeds[-1]}" in caplog.text
