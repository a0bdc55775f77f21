"""The reference-style accuracy benchmark (``benchmarks/reference_train.py``) trains, resumes and evaluates."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import write_cifar10
from helpers_training import assert_states_equal
from oodtune.models.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_train

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)


def _run(root: Path, out: Path, *extra: str) -> dict[str, Any]:
    return reference_train.main(["--data-root", str(root), "--arch", "wrn-10-1", "--epochs", "2", "--batch-size", "32",
                                 "--device", "cpu", "--out", str(out), *extra])


def _interrupted_run(root: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a run and stop it right after epoch 1 is saved, as a device's time limit would."""
    real_save = reference_train.save_checkpoint

    def save_then_stop(path: Path, *args: Any, **kwargs: Any) -> Path:
        real_save(path, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(reference_train, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _run(root, out)


def test_reference_loop_trains_resumes_bit_exactly_and_evaluates(data_env: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(data_env["root"], per_batch=40)
    whole = _run(data_env["root"], data_env["tmp"] / "whole", "--json", str(data_env["tmp"] / "whole.json"))
    assert (data_env["tmp"] / "whole.json").exists()
    assert [h["epoch"] for h in whole["history"]] == [1, 2]
    assert 0.0 <= whole["test_accuracy"] <= 1.0

    _interrupted_run(data_env["root"], data_env["tmp"] / "split", monkeypatch)
    assert (data_env["tmp"] / "split" / "last.pt").exists()
    resumed = _run(data_env["root"], data_env["tmp"] / "split")

    assert resumed["test_accuracy"] == whole["test_accuracy"]
    a, meta = load_model(data_env["tmp"] / "whole" / "model.pt")
    b, _ = load_model(data_env["tmp"] / "split" / "model.pt")
    assert_states_equal(a.state_dict(), b.state_dict())
    assert meta.stage == "pretrain" and meta.notes["loop"].startswith("reference-style")
    assert meta.train_config["epochs"] == 2
    assert not (data_env["tmp"] / "split" / "last.pt").exists()
    again = _run(data_env["root"], data_env["tmp"] / "whole")  # finished: evaluates only
    assert again["test_accuracy"] == whole["test_accuracy"] and torch.equal(
        load_model(data_env["tmp"] / "whole" / "model.pt")[0].head.weight, a.head.weight)


def test_resume_with_other_settings_is_refused(data_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(data_env["root"], per_batch=40)
    out = data_env["tmp"] / "run"
    _interrupted_run(data_env["root"], out, monkeypatch)
    with pytest.raises(SystemExit, match="use a new --out"):
        _run(data_env["root"], out, "--lr", "0.05")
