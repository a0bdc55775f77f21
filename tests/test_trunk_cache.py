"""The frozen-trunk cache of last-block segmentation fine-tuning: same losses and weights as the uncached path (up to
the cache's bf16/fp16 rounding), hits on the second epoch, a new key for other weights, and an entry written only
halfway (a killed process) is recomputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oodtune.data.objects import ObjectBank
from oodtune.data.segmentation import SegmentationSet
from oodtune.losses.pixel import build_pixel_loss
from oodtune.models import SegmentationModel, build_model
from oodtune.training.config import TrainConfig
from oodtune.training.segmentation import SegmentationTrainer
from oodtune.training.trunk_cache import TrunkCache, trunk_key

K = 11


def _data(frames: int = 6) -> tuple[SegmentationSet, ObjectBank]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (frames, 24, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, K + 1, (frames, 24, 32), dtype=np.uint8)
    data = SegmentationSet(images, labels, tuple(f"c{i}" for i in range(K)), K, "tiny")
    objs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    bank = ObjectBank(tuple(objs), tuple(np.ones((8, 8), bool) for _ in objs), ("a", "b", "c"), "objs")
    return data, bank


def _net() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(build_model("espnet-camvid", K), K, 0, ("conv", "classifier"))


def _fit(tmp: Path, cache: bool, precision: str, monkeypatch: pytest.MonkeyPatch, epochs: int = 2
         ) -> tuple[SegmentationTrainer, list[dict[str, float]], dict[str, torch.Tensor]]:
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp))
    monkeypatch.setenv("OODTUNE_TRUNK_CACHE", "1" if cache else "0")
    data, bank = _data()
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=3, outlier_batch_size=1, device="cpu", precision=precision,
                      weight_decay=0.0)
    loss = build_pixel_loss("energy-oe", num_classes=K, ignore_index=K, m_in=-5.0, m_out=-1.0)
    trainer = SegmentationTrainer(_net(), data, loss, cfg, outliers=bank)
    history = trainer.fit().history
    return trainer, history, {k: v.clone() for k, v in trainer.net.state_dict().items()}


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 2e-3), ("bf16", 2e-2)])
def test_cached_path_matches_the_uncached_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str,
                                              tol: float) -> None:
    plain, h_plain, w_plain = _fit(tmp_path, False, precision, monkeypatch)
    cached, h_cached, w_cached = _fit(tmp_path, True, precision, monkeypatch)
    assert plain.trunk_cache is None and cached.trunk_cache is not None
    # 6 frames, batch 3 (one pasted): 2 steps x 2 unpasted frames per epoch; the second epoch hits what it can
    assert cached.trunk_cache.misses + cached.trunk_cache.hits == 8 and cached.trunk_cache.hits > 0
    for a, b in zip(h_plain, h_cached, strict=True):
        assert set(a) == set(b) and len(a) > 5
        for key in set(a) - {"seconds", "images_per_s"}:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    # Adam moves every weight by about lr per step whatever its gradient's size, so near-zero gradients that differ
    # by rounding can move a few weights the other way: compare the updates as a whole
    w0 = _net().state_dict()
    moved = [(w_plain[n] - w0[n]).flatten() for n in w0 if n.startswith(("model.conv.", "model.classifier."))]
    moved_c = [(w_cached[n] - w0[n]).flatten() for n in w0 if n.startswith(("model.conv.", "model.classifier."))]
    a, b = torch.cat(moved), torch.cat(moved_c)
    assert a.abs().max() > 1e-3 and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    frozen = [n for n in w_plain if not n.startswith(("model.conv.", "model.classifier."))]
    assert all(torch.equal(w_plain[n], w_cached[n]) for n in frozen)


def test_uncached_trainer_is_unchanged_when_the_net_does_not_split(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp_path))
    data, bank = _data()
    torch.manual_seed(0)
    net = SegmentationModel(build_model("espnet-camvid", K), K, 0, ("classifier",))  # not the whole tail
    loss = build_pixel_loss("energy-oe", num_classes=K, ignore_index=K, m_in=-5.0, m_out=-1.0)
    trainer = SegmentationTrainer(net, data, loss, TrainConfig(epochs=1, batch_size=3, outlier_batch_size=1,
                                                               device="cpu"), outliers=bank)
    assert not net.splits and trainer.trunk_cache is None


def test_the_key_follows_the_frozen_weights() -> None:
    w = {"a": torch.zeros(3)}
    assert trunk_key(w, "fp", (24, 32)) == trunk_key({"a": torch.zeros(3)}, "fp", (24, 32))
    assert trunk_key(w, "fp", (24, 32)) != trunk_key({"a": torch.ones(3)}, "fp", (24, 32))
    assert trunk_key(w, "fp", (24, 32)) != trunk_key(w, "fp", (32, 24))


def test_a_half_written_entry_is_recomputed(tmp_path: Path) -> None:
    calls: list[list[int]] = []

    def compute(rows: list[int]) -> torch.Tensor:
        calls.append(rows)
        return torch.stack([torch.full((2, 3, 4), float(frames[r])) for r in rows])

    frames = [0, 1, 2]
    cache = TrunkCache("k", 4, torch.bfloat16, root=tmp_path / "k")
    first = cache.get(frames, [False, True, False], compute, torch.device("cpu"))
    assert calls == [[0, 1, 2]] and first.dtype == torch.bfloat16
    # a process killed after writing frame 2's features but before setting its flag: the flag stays 0
    filled = np.load(tmp_path / "k" / "filled.npy", mmap_mode="r+")
    filled[2, 0] = 0
    filled.flush()
    again = TrunkCache("k", 4, torch.bfloat16, root=tmp_path / "k")
    second = again.get(frames, [False, True, False], compute, torch.device("cpu"))
    assert calls[1] == [2] and again.hits == 2 and torch.equal(first, second)
    assert not list(tmp_path.glob(".tmp-*"))  # the folder was built under a temporary name and renamed
