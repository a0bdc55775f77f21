"""The CPU fast path's settings: what --precision auto means on which CPU, channels_last with it, the thread
policy, and that bf16 runs match fp32 within bf16's rounding while losses, logits and scores stay fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from oodtune.data.imageset import ImageSet
from oodtune.data.tensors import Normalizer
from oodtune.errors import ConfigError
from oodtune.evaluation import compute_outputs
from oodtune.losses import LossInputs, build_method_loss
from oodtune.losses.pixel import build_pixel_loss
from oodtune.models import FeatureModel, build_model
from oodtune.training.config import TrainConfig
from oodtune.training.trainer import Trainer
from oodtune.utils import runtime

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: True)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: False)


def test_auto_is_bf16_on_a_cpu_with_native_bf16(native: None) -> None:
    assert runtime.resolve_precision(CPU, "auto") == "bf16"
    assert runtime.channels_last_default(CPU, "auto")
    assert runtime.resolve_precision(CPU, "fp32") == "fp32" and not runtime.channels_last_default(CPU, "fp32")


def test_auto_falls_back_to_fp32_with_a_note(emulated: None, caplog: pytest.LogCaptureFixture) -> None:
    runtime._note_fp32_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="oodtune.utils.runtime"):
        assert runtime.resolve_precision(CPU, "auto") == "fp32"
        assert runtime.resolve_precision(CPU, "auto") == "fp32"
    assert len([r for r in caplog.records if "no native bf16" in r.getMessage()]) == 1  # one line per process
    assert runtime.resolve_precision(CPU, "bf16") == "bf16"  # asked for explicitly: emulated, but honoured
    assert not runtime.channels_last_default(CPU, "auto")
    with pytest.raises(ConfigError, match="precision must be"):
        runtime.resolve_precision(CPU, "fp16")


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),
    ("fpu amx_bf16 amx_tile avx512_bf16", ("amx_bf16", "avx512_bf16")),
    ("fpu sse avx2 avx512f", ()),
])
def test_bf16_flags_are_read_from_cpuinfo(monkeypatch: pytest.MonkeyPatch, flags: str,
                                          expected: tuple[str, ...]) -> None:
    monkeypatch.setattr(runtime, "_cpuinfo_flags", lambda: set(flags.split()))
    assert runtime.cpu_bf16_flags() == expected


def test_threads_respect_affinity_and_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", quota)
    quota.write_text("max 100000\n")
    assert runtime.available_cpus() == 4
    quota.write_text("250000 100000\n")  # 2.5 CPUs
    assert runtime.available_cpus() == 2
    quota.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert runtime.available_cpus() == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3


def test_set_threads_refuses_more_than_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="--threads 3: this process may use 2"):
            runtime.set_threads(3)
    finally:
        torch.set_num_threads(before)


def _wrn() -> FeatureModel:
    torch.manual_seed(0)
    return FeatureModel(build_model("wrn-16-1", 10)).eval()


def test_bf16_forward_matches_fp32_and_keeps_fp32_logits() -> None:
    net = _wrn()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref, ref_feats = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo, feats = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert lo.dtype == torch.float32 and feats.dtype == torch.bfloat16  # the classification layer runs in fp32
    # bf16 keeps 8 mantissa bits: within a few percent of the logits' spread
    assert (lo - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(feats.float(), ref_feats, dim=1).min() > 0.99


def test_compute_outputs_in_bf16_matches_fp32_without_ties() -> None:
    rng = np.random.default_rng(0)
    ds = ImageSet(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), None, (), "noise")
    ref = compute_outputs(_wrn(), ds, Normalizer(), device="cpu", show_progress=False)
    with runtime.inference_precision("bf16"):
        fast = compute_outputs(_wrn(), ds, Normalizer(), device="cpu", show_progress=False)
    assert runtime.current_inference_precision() == "fp32"  # the block ended
    assert fast.logits.dtype == torch.float32
    energy_ref, energy_fast = (torch.logsumexp(o.logits, 1) for o in (ref, fast))
    assert len(torch.unique(energy_fast)) == len(energy_fast)  # fp32 logits: no bf16 ties among 64 scores
    assert (energy_fast - energy_ref).abs().max() < 0.05 * energy_ref.abs().max()


@pytest.mark.parametrize("method", ["oe", "energy-oe", "balanced-energy+sparsity"])
def test_classification_losses_are_fp32_under_autocast(method: str) -> None:
    torch.manual_seed(0)
    prior = [0.1] * 10 if "balanced" in method else None
    loss = build_method_loss(method, prior_gamma=prior)
    inp = LossInputs(logits_in=(8 * torch.randn(6, 10)).bfloat16(), labels_in=torch.randint(0, 10, (6,)),
                     features_in=torch.rand(6, 16).bfloat16(), logits_out=(8 * torch.randn(12, 10)).bfloat16())
    ref = LossInputs(inp.logits_in.double(), inp.labels_in, inp.features_in.double(),  # type: ignore[union-attr]
                     inp.logits_out.double())  # type: ignore[union-attr]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss(inp)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(loss(ref)[0].item(), rel=1e-5)


@pytest.mark.parametrize("method", ["energy-oe", "pebal"])
def test_pixel_losses_are_fp32_under_autocast(method: str) -> None:
    torch.manual_seed(0)
    k = 5
    channels = k + (1 if method == "pebal" else 0)
    maps = (4 * torch.randn(2, channels, 8, 8)).bfloat16()
    labels = torch.randint(0, k, (2, 8, 8))
    labels[0, :2] = 254  # an outlier patch (the pasted-object label)
    from oodtune.losses.pixel import OUTLIER_LABEL
    labels[labels == 254] = OUTLIER_LABEL
    pixels = maps[:, :k].permute(0, 2, 3, 1)
    out = labels == OUTLIER_LABEL

    def inputs(m: torch.Tensor, p: torch.Tensor) -> LossInputs:
        return LossInputs(logits_in=p[~out], labels_in=labels[~out], logits_out=p[out], logits_map=m,
                          labels_map=labels)

    loss = build_pixel_loss(method, num_classes=k, ignore_index=None, m_in=-5.0, m_out=-1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss(inputs(maps, pixels))
    ref, _ = loss(inputs(maps.double(), pixels.double()))
    assert total.dtype == torch.float32 and total.item() == pytest.approx(ref.item(), rel=1e-4)


def test_trainer_bf16_records_its_precision_and_tracks_fp32(native: None) -> None:
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64),
                    tuple(str(i) for i in range(10)), "tiny")
    results = {}
    for precision in ("fp32", "auto"):
        cfg = TrainConfig(epochs=1, lr=0.01, batch_size=16, device="cpu", precision=precision, augment=False)
        trainer = Trainer(_wrn().train(), data, build_method_loss("ce"), cfg)
        results[precision] = (trainer, trainer.fit().history[0])
    fast, slow = results["auto"][0], results["fp32"][0]
    assert (fast.precision, fast.channels_last) == ("bf16", True)
    assert (slow.precision, slow.channels_last) == ("fp32", False)
    assert results["auto"][1]["ce"] == pytest.approx(results["fp32"][1]["ce"], rel=0.02)


def _dilated(channels: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False),
                               torch.nn.Conv2d(channels, channels, 1))


def test_trained_dilated_convolutions_keep_the_contiguous_format_under_cpu_bf16(
        caplog: pytest.LogCaptureFixture) -> None:
    net = _dilated(26)
    with caplog.at_level(logging.INFO, logger="oodtune"):
        assert not runtime.channels_last_for_training(net, CPU, "bf16")
    assert "dilated convolution keeps the contiguous memory format" in caplog.text
    assert not runtime.channels_last_for_training(net, CPU, "fp32")
    assert runtime.channels_last_for_training(net, torch.device("cuda"), "bf16")  # cuDNN's kernels are right
    net[0].requires_grad_(False)  # frozen: no weight gradient, channels_last is safe
    assert runtime.channels_last_for_training(net, CPU, "bf16")
    plain = torch.nn.Sequential(torch.nn.Conv2d(26, 26, 3, padding=1))
    assert runtime.channels_last_for_training(plain, CPU, "bf16")


def test_bf16_weight_gradients_of_a_dilated_convolution_are_finite_in_the_training_format() -> None:
    """The shape at which oneDNN's channels_last bf16 weight gradient returned NaN (26 channels, 22x30 maps):
    in the format the trainer picks for it, the gradient is finite and near fp32's."""
    torch.manual_seed(0)
    net, x = _dilated(26), torch.randn(2, 26, 22, 30)
    fmt = torch.channels_last if runtime.channels_last_for_training(net, CPU, "bf16") else torch.contiguous_format
    fast = _dilated(26).to(memory_format=fmt)
    fast.load_state_dict(net.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x.contiguous(memory_format=fmt)).float().square().mean().backward()
    net(x).square().mean().backward()
    grad, ref = fast[0].weight.grad, net[0].weight.grad
    assert grad is not None and ref is not None and torch.isfinite(grad).all()
    assert float((grad - ref).norm() / ref.norm()) < 0.02


def test_the_command_line_sets_threads_and_the_scoring_precision(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oodtune.cli import main, threads_option

    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    before = torch.get_num_threads()
    seen: dict[str, object] = {}

    @threads_option
    def probe(**kw: object) -> None:
        seen.update(kw, threads=torch.get_num_threads(), precision=runtime.current_inference_precision())

    try:
        probe(threads=1, precision="bf16", other=3)
        assert seen == {"precision": "bf16", "other": 3, "threads": 1}  # a training command keeps its precision
        probe(threads=None, inference_precision="fp32")
        assert seen["precision"] == "fp32" and "inference_precision" not in seen
    finally:
        torch.set_num_threads(before)
    res = CliRunner().invoke(main, ["pretrain", "--threads", "5", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--threads 5: this process may use 2 CPU(s)" in res.output
    assert not (tmp_path / "run").exists()


def test_wrn_dropout_under_cpu_autocast_keeps_its_distribution() -> None:
    from oodtune.models.wrn import dropout

    torch.manual_seed(0)
    x = torch.ones(64, 16, 32, 32).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dropout(x, 0.3, True)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    kept = y.detach().float() != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    assert torch.allclose(y.detach().float()[kept], torch.tensor(1 / 0.7), rtol=4e-3)  # bf16 rounding of 1/0.7
    y.float().sum().backward()
    assert torch.equal(x.grad.float() != 0, kept)  # type: ignore[union-attr]  # gradients flow through kept units
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dropout(x, 0.3, False) is x
    torch.manual_seed(0)
    a = dropout(torch.ones(8, 4), 0.3, True)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(torch.ones(8, 4), 0.3, True))  # fp32: the same draws as before


def test_bf16_evaluations_are_stored_apart_from_fp32_ones(tmp_path: Path) -> None:
    from oodtune.benchmark.store import EvalStore

    sha = "ab" * 32
    fp32, bf16 = EvalStore(tmp_path), EvalStore(tmp_path, precision="bf16")
    assert fp32.folder(sha) == tmp_path / sha[:16]  # the folders written before precision was recorded
    assert bf16.folder(sha) == tmp_path / f"{sha[:16]}-bf16" != fp32.folder(sha)
