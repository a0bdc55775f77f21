"""The training loop: it learns, is deterministic, resumes exactly, and wires ID + outlier batches correctly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers_training import (
    Crash,
    assert_states_equal,
    crash_after_epochs,
    easy_imageset,
    make_trainer,
    random_imageset,
    state_of,
    tiny_config,
    tiny_net,
)
from oodtune.data.tensors import Normalizer, to_device_uint8
from oodtune.errors import DataError, ResumeMismatchError
from oodtune.losses.terms import LossInputs, build_method_loss
from oodtune.models.checkpoint import load_model, read_checkpoint
from oodtune.training.config import TrainConfig
from oodtune.training.sampling import OutlierSampler
from oodtune.training.trainer import FINAL, LAST, Trainer, cosine_factor
from oodtune.utils.runtime import compile_mode

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")


class RecordingLoss:
    """A CompositeLoss-compatible loss (CE on ID + a small energy-like term on outliers) that records its inputs."""

    def __init__(self, needs_outliers: bool = True, needs_features: bool = False) -> None:
        self.needs_outliers, self.needs_features = needs_outliers, needs_features
        self.calls: list[dict[str, Any]] = []

    def __call__(self, inp: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls.append({
            "in": tuple(inp.logits_in.shape), "labels": tuple(inp.labels_in.shape),
            "out": None if inp.logits_out is None else tuple(inp.logits_out.shape),
            "features": None if inp.features_in is None else tuple(inp.features_in.shape),
        })
        parts = {"ce": F.cross_entropy(inp.logits_in, inp.labels_in)}
        if inp.logits_out is not None:
            parts["out"] = 0.01 * torch.logsumexp(inp.logits_out, 1).mean()
        total = torch.stack(list(parts.values())).sum()
        return total, {k: v.detach() for k, v in parts.items()}


def _count_forwards(trainer: Trainer) -> list[int]:
    """Batch sizes of every forward pass through the trainer's network."""
    sizes: list[int] = []
    trainer.net.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    return sizes


# -- learning and determinism ------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_tiny_run_learns_an_easy_task(tmp_path: Path) -> None:
    ds = easy_imageset(256)
    result = make_trainer(ds, build_method_loss("ce"), run_dir=tmp_path, epochs=3).fit()
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["ce"] < hist[0]["ce"]
    assert hist[-1]["train_acc"] > 0.7, hist  # chance is 0.25
    assert hist[-1]["lr"] == pytest.approx(1e-6, rel=1e-3)  # cosine schedule ends at lr_min
    assert all(h["images_per_s"] > 0 for h in hist)
    # the final checkpoint is a loadable oodtune model that classifies held-out data of the same task
    model, meta = load_model(result.checkpoint)
    assert list(meta.history) == hist and meta.train_config["epochs"] == 3
    assert not (tmp_path / LAST).exists()
    test = easy_imageset(64, seed=1)
    with torch.no_grad():  # the trainer used the default (CIFAR) normalisation
        acc = (model(Normalizer()(to_device_uint8(test, "cpu"))).argmax(1).numpy() == test.labels).mean()
    assert acc > 0.7, acc


@pytest.mark.e2e
def test_same_seed_same_weights_different_seed_different_weights() -> None:
    ds, out = random_imageset(128), random_imageset(128, seed=9, labelled=False)
    runs = [make_trainer(ds, build_method_loss("energy-oe"), outliers=out, seed=s, epochs=2) for s in (0, 0, 1)]
    for t in runs:
        t.fit()
    assert_states_equal(state_of(runs[0].net), state_of(runs[1].net))
    assert not torch.equal(runs[0].net.model.conv1.weight, runs[2].net.model.conv1.weight)


def test_cosine_factor() -> None:
    assert cosine_factor(0, 100, 0.1) == pytest.approx(1.0)
    assert cosine_factor(50, 100, 0.1) == pytest.approx(0.5 + 0.5e-5)
    assert cosine_factor(100, 100, 0.1) * 0.1 == pytest.approx(1e-6)


# -- resume ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("method", ["ce", "energy-oe"])
def test_resume_after_crash_matches_a_straight_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   method: str) -> None:
    """3 epochs straight == crash after epoch 1 + resume, bit for bit (weights, BN stats, history)."""
    ds = random_imageset(128)
    outliers = random_imageset(160, seed=5, labelled=False)  # 160 / 64: the sampler's permutation spans epochs
    kwargs: dict[str, Any] = {"outliers": outliers, "epochs": 3, "max_steps_per_epoch": 3}

    straight = make_trainer(ds, build_method_loss(method), run_dir=tmp_path / "a", **kwargs).fit()

    with monkeypatch.context() as m:
        crash_after_epochs(m, 1)
        with pytest.raises(Crash):
            make_trainer(ds, build_method_loss(method), run_dir=tmp_path / "b", **kwargs).fit()
    assert read_checkpoint(tmp_path / "b" / LAST)["train_state"]["epoch"] == 1
    assert not (tmp_path / "b" / FINAL).exists()
    # a fresh process: different initial weights and a different global RNG state must not matter
    torch.manual_seed(1234)
    resumed = make_trainer(ds, build_method_loss(method), run_dir=tmp_path / "b", net_seed=99, **kwargs).fit()

    assert_states_equal(read_checkpoint(straight.checkpoint)["model"], read_checkpoint(resumed.checkpoint)["model"])
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in resumed.history]
    assert not (tmp_path / "b" / LAST).exists()


def test_resume_with_changed_settings_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = random_imageset(64)
    with monkeypatch.context() as m:
        crash_after_epochs(m, 1)
        with pytest.raises(Crash):
            make_trainer(ds, build_method_loss("ce"), run_dir=tmp_path).fit()
    with pytest.raises(ResumeMismatchError, match="other settings"):
        make_trainer(ds, build_method_loss("ce"), run_dir=tmp_path, lr=0.01).fit()


def test_refuses_to_overwrite_a_finished_run(tmp_path: Path) -> None:
    ds = random_imageset(64)
    make_trainer(ds, build_method_loss("ce"), run_dir=tmp_path, epochs=1).fit()
    before = (tmp_path / FINAL).read_bytes()
    with pytest.raises(FileExistsError, match="finished"):
        make_trainer(ds, build_method_loss("ce"), run_dir=tmp_path, epochs=1).fit()
    assert (tmp_path / FINAL).read_bytes() == before


# -- validation ------------------------------------------------------------------------------------------
def test_class_count_mismatch() -> None:
    ds = random_imageset(32, num_classes=4)
    with pytest.raises(DataError, match="4 classes but the model outputs 6"):
        Trainer(tiny_net(num_classes=6), ds, build_method_loss("ce"), tiny_config())


def test_unlabelled_training_set() -> None:
    with pytest.raises(DataError, match="needs labels"):
        Trainer(tiny_net(), random_imageset(32, labelled=False), build_method_loss("ce"), tiny_config())


def test_outlier_method_without_outliers() -> None:
    with pytest.raises(DataError, match="needs auxiliary outliers"):
        make_trainer(random_imageset(32), build_method_loss("oe"))


def test_outlier_resolution_mismatch() -> None:
    with pytest.raises(DataError, match="same --resolution"):
        make_trainer(random_imageset(32), build_method_loss("oe"), outliers=random_imageset(64, size=8, labelled=False))


# -- wiring of a step ------------------------------------------------------------------------------------
def test_id_and_outlier_batches_share_one_forward_pass() -> None:
    ds, out = random_imageset(128), random_imageset(200, seed=3, labelled=False)
    loss = RecordingLoss(needs_outliers=True)
    trainer = make_trainer(ds, loss, outliers=out, epochs=1, max_steps_per_epoch=3)
    sizes = _count_forwards(trainer)
    result = trainer.fit()
    assert sizes == [32 + 64] * 3, "one forward over the concatenated ID + outlier batch per step"
    assert [c["in"] for c in loss.calls] == [(32, 4)] * 3
    assert [c["out"] for c in loss.calls] == [(64, 4)] * 3
    assert all(c["labels"] == (32,) and c["features"] is None for c in loss.calls)
    assert set(result.history[0]) >= {"ce", "out", "train_acc", "lr"}


def test_id_only_loss_ignores_given_outliers_and_gets_features() -> None:
    ds, out = random_imageset(128), random_imageset(200, seed=3, labelled=False)
    loss = RecordingLoss(needs_outliers=False, needs_features=True)
    trainer = make_trainer(ds, loss, outliers=out, epochs=1, max_steps_per_epoch=2)
    assert trainer.outlier_images is None  # not even copied to the device
    sizes = _count_forwards(trainer)
    trainer.fit()
    assert sizes == [32, 32]
    assert [c["out"] for c in loss.calls] == [None, None]
    assert [c["features"] for c in loss.calls] == [(32, 64)] * 2


def test_steps_per_epoch() -> None:
    ds = random_imageset(100)
    assert make_trainer(ds, build_method_loss("ce"), batch_size=32).steps_per_epoch() == 3
    assert make_trainer(ds, build_method_loss("ce"), batch_size=32, max_steps_per_epoch=2).steps_per_epoch() == 2
    assert make_trainer(ds, build_method_loss("ce"), batch_size=128).steps_per_epoch() == 1


def test_augmentation_off_feeds_normalised_originals() -> None:
    """With augment=False the network sees exactly Normalizer(images[idx]) (no crop/flip)."""
    ds = random_imageset(32)
    trainer = make_trainer(ds, RecordingLoss(needs_outliers=False), epochs=1, augment=False, batch_size=32)
    seen: list[torch.Tensor] = []
    trainer.net.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    trainer.fit()
    expected = trainer.normalizer(trainer.train_x.resident).flatten(1)
    nearest = torch.cdist(seen[0].flatten(1), expected, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert torch.all(nearest.values == 0), "every input is an unaugmented, normalised training image"
    assert sorted(nearest.indices.tolist()) == list(range(32))



@pytest.mark.e2e
@pytest.mark.parametrize("scope", ["model", "step"])
def test_compiled_path_runs_on_cpu_and_matches_eager(tmp_path: Path, scope: str) -> None:
    """The GPU fast path's ``torch.compile`` (CUDA graphs where CUDA exists; inductor skips them on CPU) trains
    like the eager path and writes a checkpoint that loads like any other, whether it compiles the model alone
    or the whole step (crop/flip + normalisation + forward over ID and outliers + Balanced Energy + Sparsity
    loss). Dropout is off: compiled dropout draws its masks from a different random stream, so only a
    dropout-free net can be compared step for step."""
    ds, aux = easy_imageset(64), random_imageset(128, labelled=False, seed=3)
    loss = lambda: build_method_loss("balanced-energy+sparsity", prior_gamma=[0.4, 0.3, 0.2, 0.1])  # noqa: E731
    eager, compiled = (make_trainer(ds, loss(), outliers=aux, run_dir=tmp_path / mode, epochs=1, compile=mode,
                                    compile_scope=scope, drop_rate=0.0).fit() for mode in ("none", "reduce-overhead"))
    for part in ("ce", "balanced_energy", "sparsity"):
        assert compiled.history[0][part] == pytest.approx(eager.history[0][part], rel=1e-4), part
    assert compiled.history[0]["train_acc"] == eager.history[0]["train_acc"]
    model, meta = load_model(compiled.checkpoint)
    assert meta.train_config["compile"] == "reduce-overhead"
    assert meta.train_config["compile_scope"] == scope
    reference = state_of(load_model(eager.checkpoint)[0])
    assert state_of(model).keys() == reference.keys()
    for key, value in state_of(model).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-4, msg=key)


def test_train_config_rejects_unknown_compile_settings() -> None:
    with pytest.raises(ValueError, match="compile_scope"):
        TrainConfig(compile_scope="everything")
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(compile="fast")


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["ce", "oe", "energy-oe", "balanced-energy+sparsity"])
def test_whole_step_traces_as_one_graph(method: str) -> None:
    """``--compile-scope step`` pays off only if crop/flip, normalisation, the forward pass and every loss
    term land in ONE graph (one CUDA graph per direction): no graph breaks for any method."""
    ds, aux = easy_imageset(64), random_imageset(128, labelled=False, seed=3)
    loss = build_method_loss(method, prior_gamma=[0.4, 0.3, 0.2, 0.1] if "balanced" in method else None)
    trainer = make_trainer(ds, loss, outliers=aux if loss.needs_outliers else None, compile="reduce-overhead",
                           compile_scope="step")
    gen = torch.Generator().manual_seed(0)
    sampler = OutlierSampler(len(aux), 64, gen) if loss.needs_outliers else None
    batch = trainer._draw(torch.arange(32), gen, sampler)
    explained = torch._dynamo.explain(lambda b: trainer._forward(trainer.net, b))(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compile_auto_means_cuda_graphs_on_cuda_and_eager_on_cpu() -> None:
    assert compile_mode("auto", torch.device("cuda")) == "reduce-overhead"
    assert compile_mode("auto", torch.device("cuda"), world=2) == "none"  # DDP: CUDA graphs unmeasured there
    assert compile_mode("auto", torch.device("cpu")) == "none"
    assert compile_mode("max-autotune", torch.device("cpu")) == "max-autotune"  # an explicit mode is kept
    assert TrainConfig().compile == "auto"
    trainer = make_trainer(easy_imageset(32), build_method_loss("ce"), compile="auto")
    assert trainer.compile == "none" and trainer.loss.check_finite  # CPU: eager, per-step finiteness check
