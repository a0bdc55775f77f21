"""Learning-rate schedules: the cosine and PEBAL's poly decay by formula, what the loop applies, and that runs
stored before ``lr_schedule`` existed still resume and still count as finished benchmark runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from helpers_training import Crash, crash_after_epochs, make_trainer, random_imageset
from oodtune.benchmark.provenance import config_differences
from oodtune.cli import main
from oodtune.errors import ConfigError, ResumeMismatchError
from oodtune.losses.terms import build_method_loss
from oodtune.models.checkpoint import save_atomic
from oodtune.training.config import FINETUNE, LEGACY_VALUES, PRETRAIN, SEGMENTATION_FINETUNE, TrainConfig
from oodtune.training.trainer import LAST, Trainer, lr_factor, poly_factor


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")


def test_poly_factor_is_pebals_formula() -> None:
    # PEBAL's WarmUpPolyLR without warm-up: start_lr * (1 - t/T)^0.9, clipped to [1e-8, start_lr]
    for t in (0, 1, 37, 50, 99):
        assert poly_factor(t, 100, 1e-5) == pytest.approx((1 - t / 100) ** 0.9, rel=1e-12)
    assert poly_factor(50, 100, 1e-5) == pytest.approx(0.535886731268146, rel=1e-12)  # 0.5 ** 0.9 by hand
    assert poly_factor(100, 100, 1e-5) * 1e-5 == pytest.approx(1e-8)  # the floor, not 0
    assert lr_factor("poly", 50, 100, 1e-5) == poly_factor(50, 100, 1e-5)
    assert lr_factor("cosine", 50, 100, 0.1) == pytest.approx(0.5 + 0.5e-5)


def test_task_defaults_and_bad_values() -> None:
    assert (PRETRAIN.lr_schedule, FINETUNE.lr_schedule, SEGMENTATION_FINETUNE.lr_schedule) == ("cosine", "cosine",
                                                                                             "poly")
    with pytest.raises(ConfigError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")


def _steps_lr(trainer: Trainer) -> list[float]:
    """The lr of every optimiser step of ``trainer.fit()``."""
    seen: list[float] = []
    real = torch.optim.SGD.step

    def spy(opt: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        seen.append(opt.param_groups[0]["lr"])
        return real(opt, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.optim.SGD, "step", spy)
        trainer.fit()
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_the_loop_applies_the_schedule_per_step(schedule: str) -> None:
    trainer = make_trainer(random_imageset(96), build_method_loss("ce"), epochs=2, lr=0.05, lr_schedule=schedule)
    seen = _steps_lr(trainer)
    total = len(seen)
    assert total == 2 * trainer.steps_per_epoch() and total >= 4
    want = [0.05 * lr_factor(schedule, t, total, 0.05) for t in range(total)]
    assert seen == pytest.approx(want, rel=1e-9)
    other = "poly" if schedule == "cosine" else "cosine"
    assert not math.isclose(seen[-1], 0.05 * lr_factor(other, total - 1, total, 0.05), rel_tol=1e-3)


def _crashed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unfinished run after epoch 1 whose stored configuration predates ``lr_schedule``."""
    with monkeypatch.context() as m:
        crash_after_epochs(m, 1)
        with pytest.raises(Crash):
            make_trainer(random_imageset(64), build_method_loss("ce"), run_dir=tmp_path, epochs=2).fit()
    ckpt = torch.load(tmp_path / LAST, weights_only=True)  # the raw stored dicts
    del ckpt["train_state"]["config"]["lr_schedule"]
    save_atomic(ckpt, tmp_path / LAST)


def test_a_run_stored_before_the_option_resumes_as_cosine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crashed_run(tmp_path, monkeypatch)
    with pytest.raises(ResumeMismatchError, match="lr_schedule: 'cosine' -> 'poly'"):
        make_trainer(random_imageset(64), build_method_loss("ce"), run_dir=tmp_path, epochs=2,
                     lr_schedule="poly").fit()
    result = make_trainer(random_imageset(64), build_method_loss("ce"), run_dir=tmp_path, epochs=2).fit()
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_finished_runs_without_the_option_compare_as_cosine() -> None:
    recorded = {k: v for k, v in vars(FINETUNE).items() if k not in LEGACY_VALUES}
    assert config_differences(recorded, FINETUNE) == []
    assert config_differences(recorded, FINETUNE.replace(lr_schedule="poly")) == ["lr_schedule: 'cosine' -> 'poly'"]
    assert config_differences({**recorded, "paste_mode": "reference"}, FINETUNE) == [
        "paste_mode: 'reference' -> 'object'"]


def test_cli_offers_the_schedule() -> None:
    out = CliRunner().invoke(main, ["finetune", "--help"], terminal_width=200).output
    assert "--lr-schedule [cosine|poly]" in out and "poly for segmentation" in out
    out = CliRunner().invoke(main, ["pretrain", "--help"], terminal_width=200).output
    assert "--lr-schedule [cosine|poly]" in out
