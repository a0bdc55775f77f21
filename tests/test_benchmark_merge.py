"""Merging output folders of one benchmark (``oodtune benchmark --merge DIR``): the pretrained models of a nested
benchmark trained into two folders, as two machines would, then reported as one — through the real grid on a tiny
offline data root (WRN-10-1, 1-2 steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures_data import offline_env
from helpers_cli import fails, ok
from helpers_lock import lock_held_elsewhere
from oodtune.benchmark import load_benchmark_config, merge_outputs, run_nested
from oodtune.errors import MergeError, OutputInUseError

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

CONFIG = """
pretrain = {{ epochs = 1, batch_size = 8, max_steps_per_epoch = 2, lr = 0.01 }}
finetune = {{ epochs = 1, batch_size = 8, outlier_batch_size = 16, max_steps_per_epoch = 1 }}
methods = [{{ label = "MSP", method = "msp" }}, {{ label = "EnergyOE", method = "energy-oe" }}]
comparisons = [{{ better = "EnergyOE", than = "MSP" }}]

[benchmark]
name = "tiny merge"
arch = "wrn-10-1"
device = "cpu"
data_root = "{root}"
out = "{out}"
ood_far = ["gaussian"]
num_ood = 16
seeds = [0, 1]
pretrain_seeds = [0, 1]
"""

RUNS = ["pretrain-s1/pretrain", "pretrain-s1/runs/energyoe-s0", "pretrain-s1/runs/energyoe-s1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("merge"), train_per_class=5, test_per_class=4) as e:
        yield e


def _config(env: dict[str, Path], out: str) -> Path:
    path = env["tmp"] / f"{out}.toml"
    path.write_text(CONFIG.format(root=env["root"], out=env["tmp"] / out))
    return path


def _copy(env: dict[str, Path], name: str, to: str) -> Path:
    shutil.copytree(env["tmp"] / name, env["tmp"] / to)
    return env["tmp"] / to


@pytest.fixture(scope="module")
def halves(env: dict[str, Path]) -> dict[str, Any]:
    """Pretrained model s0 (and its rows) trained into folder "a", model s1 into folder "b"."""
    run_nested(load_benchmark_config(_config(env, "a")), "test", n_boot=40, models=[0])
    run_nested(load_benchmark_config(_config(env, "b")), "test", n_boot=40, models=[1])
    return {"a": env["tmp"] / "a", "b": env["tmp"] / "b"}


def test_two_folders_report_as_one(env, halves):
    a, b = halves["a"], halves["b"]
    cfg = load_benchmark_config(_config(env, "a"))
    assert json.loads((a / "comparisons.json").read_text())["rows"][0]["models"] == 1  # before: model s0 only
    summary = merge_outputs(cfg, b)
    assert sorted(summary.runs) == RUNS and summary.present == summary.unfinished == summary.kept == []
    assert summary.files > 0 and "3 run(s) taken" in summary.describe()
    run_nested(cfg, "test", report_only=True, n_boot=40)
    merged = json.loads((a / "comparisons.json").read_text())
    assert merged["pending"] == [] and all(r["models"] == 2 and r["cells"] == 4 for r in merged["rows"])
    theirs = json.loads((b / "pretrain-s1" / "results.json").read_text())["per_seed"]
    assert json.loads((a / "pretrain-s1" / "results.json").read_text())["per_seed"] == theirs
    for run in RUNS:  # copied whole, byte for byte
        assert (a / run / "model.pt").read_bytes() == (b / run / "model.pt").read_bytes()
    again = merge_outputs(cfg, b)  # a second merge takes nothing and changes nothing
    assert sorted(again.present) == RUNS and again.runs == [] and again.files == 0 and again.kept == []


def test_a_run_with_other_weights_is_refused_and_nothing_replaced(env, halves):
    other = _copy(env, "b", "b-other")
    weights = other / RUNS[1] / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    ours = (halves["b"] / RUNS[1] / "model.pt").read_bytes()
    with pytest.raises(MergeError, match=r"other weights.*delete the one you do not want"):
        merge_outputs(load_benchmark_config(_config(env, "b")), other)
    assert (halves["b"] / RUNS[1] / "model.pt").read_bytes() == ours


def test_an_unfinished_run_is_not_taken_and_one_here_is_a_conflict(env, halves):
    source = _copy(env, "b", "b-unfinished")
    for name in ("model.pt", "run.json"):
        (source / RUNS[2] / name).unlink()
    summary = merge_outputs(load_benchmark_config(_config(env, "fresh")), source)
    assert summary.unfinished == [RUNS[2]] and sorted(summary.runs) == RUNS[:2]
    assert not (env["tmp"] / "fresh" / RUNS[2]).exists()
    with pytest.raises(MergeError, match="an unfinished run"):  # the other way round: the unfinished one is here
        merge_outputs(load_benchmark_config(_config(env, "b-unfinished")), halves["b"])


def test_evaluations_missing_here_are_taken_and_differing_ones_kept(env, halves):
    dest = _copy(env, "b", "b-evals")
    folders = sorted(p for p in (dest / "pretrain-s1" / "evals").glob("*/*") if p.is_dir())
    gone, changed = folders[0], folders[1]
    shutil.rmtree(gone)
    scores = sorted(changed.glob("*.npy"))[0]
    np.save(scores, np.load(scores) + 1.0)
    before = scores.read_bytes()
    summary = merge_outputs(load_benchmark_config(_config(env, "b-evals")), halves["b"])
    assert summary.kept == [str(changed.relative_to(dest))] and summary.runs == []
    assert summary.files == len(list((halves["b"] / gone.relative_to(dest)).iterdir()))
    assert sorted(p.name for p in gone.iterdir()) == sorted(p.name for p in (halves["b"] / gone.relative_to(dest))
                                                            .iterdir())
    assert scores.read_bytes() == before  # this folder's value kept, and named in the summary
    assert "this folder's kept" in summary.describe()


def test_merge_waits_for_no_writer(env, halves):
    with lock_held_elsewhere(halves["b"] / "pretrain-s0", shared=True), pytest.raises(OutputInUseError):
        merge_outputs(load_benchmark_config(_config(env, "b")), halves["a"])
    assert not (halves["b"] / "pretrain-s0" / "pretrain").exists()


def test_command_line_merges_then_reports(env, halves):
    dest = _copy(env, "a", "a-cli")
    shutil.rmtree(dest / "pretrain-s1", ignore_errors=True)
    res = ok("benchmark", _config(env, "a-cli"), "--merge", halves["b"], "--report-only", "--n-boot", "40")
    assert "merged" in res.output and "3 run(s) taken" in res.output
    assert json.loads((dest / "comparisons.json").read_text())["pending"] == []
    config = _config(env, "a-cli")
    fails("benchmark", config, "--merge", env["tmp"] / "nowhere", "--report-only", match="no such folder")
    fails("benchmark", config, "--merge", dest, "--report-only", match="own output folder")
