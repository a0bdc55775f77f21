"""Training settings and runs under clumsy input: integer fields that refuse fractions on every path (TOML,
``--config``, the Python TrainConfig), and a run whose training diverges says so, with where and what."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import oodtune.pipeline as pipe
from fixtures_data import offline_env
from helpers_cli import fails
from oodtune.benchmark import load_benchmark_config
from oodtune.errors import ConfigError
from oodtune.training.config import TrainConfig
from oodtune.training.trainer import LAST


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env(tmp_path_factory.mktemp("train-bad"), train_per_class=10, test_per_class=4) as e:
        yield e


@pytest.mark.parametrize("field", ["epochs", "batch_size", "outlier_batch_size", "seed", "max_steps_per_epoch"])
@pytest.mark.parametrize("value", [1.7, 2.0, True, "3"])
def test_integer_fields_refuse_non_integers_in_python(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be an integer"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_integer_fields_refuse_fractions_in_benchmark_toml(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[benchmark]\nood_far = ["gaussian"]\n[pretrain]\nepochs = 1.7\n[[methods]]\nlabel = "E"\n'
                    'method = "energy"\n')
    with pytest.raises(ConfigError, match="epochs.*1.7"):
        load_benchmark_config(path)


@pytest.mark.parametrize("option", ["epochs", "batch-size", "max-steps-per-epoch"])
def test_integer_options_refuse_fractions_in_config_files(env: dict[str, Path], tmp_path: Path, option: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[pretrain]\n{option} = 1.7\n")
    fails("pretrain", "--config", config, "--data-root", env["root"], "--arch", "wrn-10-1", "--out", tmp_path / "o",
          "--device", "cpu", match="1.7", code=2)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Path]) -> Path:
    cfg = TrainConfig(epochs=1, batch_size=8, outlier_batch_size=8, max_steps_per_epoch=1, lr=0.01, device="cpu",
                      precision="fp32")
    return pipe.pretrain(env["tmp"] / "pre", arch="wrn-10-1", data_root=env["root"], config=cfg)


@pytest.mark.e2e
@pytest.mark.parametrize(("lr", "steps", "epoch", "what"), [
    ("1e6", "2", 2, "non-finite loss term(s) ce=nan"),  # the loss of the next step is NaN
    ("3e38", "1", 1, "the weights became non-finite"),  # one update of finite loss overflows float32
])
def test_a_diverging_fine_tune_blames_training_and_keeps_the_last_good_checkpoint(
        env: dict[str, Path], pretrained: Path, tmp_path: Path, lr: str, steps: str, epoch: int, what: str) -> None:
    out = tmp_path / "ft"
    res = fails("finetune", pretrained, "--method", "energy-oe", "--data-root", env["root"], "--out", out, "--lr", lr,
                "--epochs", "2", "--batch-size", "8", "--outlier-batch-size", "8", "--max-steps-per-epoch", steps,
                "--device", "cpu", match="training diverged", code=1)
    assert f"epoch {epoch}, step 1: {what}" in res.output and "Lower the learning rate" in res.output
    assert "checkpoint may be diverged" not in res.output
    if epoch > 1:
        assert "last good checkpoint (after epoch 1) is kept" in res.output
        state = torch.load(out / LAST, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    else:
        assert "no checkpoint was written" in res.output and not (out / LAST).exists()
