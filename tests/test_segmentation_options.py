"""Segmentation fine-tuning options: which part trains (gradients, BatchNorm updates, the checkpoint's record), the
reference pasting mode (object scale, frame flip / scale / crop, labels, share, seeding) and the option checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oodtune.data.mixing import (
    REFERENCE_SHARE,
    paste_native,
    reference_augment,
    reference_object_scale,
)
from oodtune.data.objects import ObjectBank
from oodtune.data.segmentation import SegmentationSet
from oodtune.data.tensors import Normalizer
from oodtune.errors import ConfigError, DataError, ModelError
from oodtune.losses.pixel import OUTLIER_LABEL, build_pixel_loss
from oodtune.models import RunMeta, SegmentationModel, build_model, load_model, resolve_train_part, save_checkpoint
from oodtune.training.config import TrainConfig
from oodtune.training.sampling import OutlierSampler
from oodtune.training.segmentation import SegmentationTrainer

K = 11  # CamVid classes; the ESPNet has one more (void / abstention) output
HEAD = ("conv", "classifier")
DECODER = ("level3_C", "br", "conv", "up_l3", "combine_l2_l3", "up_l2", "classifier")


def _espnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("espnet-camvid", K + 1)


@pytest.mark.parametrize(("part", "want"), [(None, HEAD), ("head", HEAD), ("decoder", DECODER), ("all", ()),
                                            ("conv, up_l2", ("conv", "up_l2"))])
def test_train_part_names_the_modules(part: str | None, want: tuple[str, ...]) -> None:
    assert resolve_train_part(_espnet(), "espnet-camvid", part, HEAD) == want


def test_train_part_refuses_what_it_cannot_resolve() -> None:
    with pytest.raises(ModelError, match="'decoder' is defined for"):
        resolve_train_part(nn.Conv2d(3, 3, 1), "pkg.mod:factory", "decoder", ())
    with pytest.raises(ModelError, match="no module 'nope'"):
        SegmentationModel(_espnet(), K, 1, resolve_train_part(_espnet(), "espnet-camvid", "conv,nope", HEAD))
    with pytest.raises(ConfigError, match="train_part is empty"):
        TrainConfig(train_part=" ")


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None}


@pytest.mark.parametrize("part", ["head", "decoder", "all"])
def test_only_the_trained_part_gets_gradients_and_updates_batchnorm(part: str) -> None:
    model = _espnet()
    names = resolve_train_part(model, "espnet-camvid", part, HEAD)
    net = SegmentationModel(model, K, 1, names).train()
    prefixes = tuple(f"{n}." for n in names)
    before = _bn_stats(model)
    net(torch.rand(2, 3, 24, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        trained = not names or name.startswith(prefixes)
        assert p.requires_grad == trained and (p.grad is not None) == trained, name
    moved = {n for n, v in _bn_stats(model).items() if not torch.equal(v, before[n])}
    trained_bn = {n for n in before if not names or n.startswith(prefixes) or n in names}
    assert moved == trained_bn and moved  # frozen BatchNorm keeps the pretrained statistics
    assert len(list(net.trainable_parameters())) == sum(p.requires_grad for p in model.parameters())


def test_the_checkpoint_records_the_trained_part(tmp_path: Path) -> None:
    model = _espnet()
    names = resolve_train_part(model, "espnet-camvid", "decoder", HEAD)
    meta = RunMeta(arch="espnet-camvid", num_classes=K, classes=tuple(f"c{i}" for i in range(K)),
                   mean=(0.3, 0.3, 0.3), std=(50.0, 50.0, 50.0), resolution=24, task="segmentation",
                   stage="finetune", dataset="camvid", extra_channels=1, ignore_index=11, input_size=(32, 24),
                   trainable=names)
    net = SegmentationModel(model, K, 1, names)
    path = save_checkpoint(tmp_path / "m.pt", net, meta)
    loaded, back = load_model(path)
    assert back.trainable == DECODER
    rewrapped = SegmentationModel(loaded, K, 1, back.trainable)
    assert [n for n, p in rewrapped.model.named_parameters() if p.requires_grad] == \
        [n for n, p in net.model.named_parameters() if p.requires_grad]


# -- the reference pasting mode -------------------------------------------------------------------------------


def test_objects_keep_their_share_of_the_frame_pixels() -> None:
    assert reference_object_scale((2048, 1024)) == pytest.approx(1.0)
    assert reference_object_scale((1024, 512)) == pytest.approx(0.5)
    assert reference_object_scale((480, 360)) == pytest.approx(np.sqrt(480 * 360 / (2048 * 1024)))


def test_paste_native_pastes_every_object_at_its_scale() -> None:
    rng = np.random.default_rng(0)
    frame = np.zeros((60, 80, 3), np.uint8)
    labels = np.zeros((60, 80), np.uint8)
    a = np.full((10, 20, 3), 200, np.uint8)
    b = np.full((6, 6, 3), 100, np.uint8)
    mask_a, mask_b = np.ones((10, 20), bool), np.ones((6, 6), bool)
    mask_b[0] = False  # a masked-out row stays the frame's
    paste_native(frame, labels, [a, b], [mask_a, mask_b], [0.5, 1.0], rng, OUTLIER_LABEL)
    assert (frame == 200).all(-1).sum() + (frame == 100).all(-1).sum() == (labels == OUTLIER_LABEL).sum()
    assert (frame == 200).all(-1).sum() in range(5 * 10 - 10, 5 * 10 + 1)  # a 5x10 piece, or less where b covers
    assert (frame == 100).all(-1).sum() == 5 * 6
    # an object larger than the frame is shrunk to fit
    big_labels = np.zeros((8, 8), np.uint8)
    paste_native(np.zeros((8, 8, 3), np.uint8), big_labels, [a], [mask_a], [1.0], rng, OUTLIER_LABEL)
    assert (big_labels == OUTLIER_LABEL).any(0).all()


def test_reference_augment_scales_crops_pads_and_flips() -> None:
    h, w = 24, 32
    frame = np.zeros((h, w, 3), np.uint8)
    frame[:, : w // 2] = 255  # left half white
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2:] = 3
    out, lab = reference_augment(frame, labels, np.random.default_rng(0), scales=(0.5,), flip=0.0, fill=(7, 8, 9),
                                 void=11)
    assert out.shape == (h, w, 3) and lab.shape == (h, w)
    assert (lab[h // 2:] == 11).all() and (lab[:, w // 2:] == 11).all()  # padding is void ...
    assert (out[h // 2:] == (7, 8, 9)).all()  # ... in the mean colour
    assert set(np.unique(lab[: h // 2, : w // 2])) == {0, 3}  # nearest: no new label values
    assert (lab[: h // 2, : w // 4] == 0).all() and (out[: h // 2, : w // 4 - 1] == 255).all()
    # scale 2: a crop of the frame's size with no padding; labels are those of the scaled frame
    out2, lab2 = reference_augment(frame, labels, np.random.default_rng(1), scales=(2.0,), flip=0.0)
    assert out2.shape == (h, w, 3) and set(np.unique(lab2)) <= {0, 3}
    # an explicit crop size
    out3, lab3 = reference_augment(frame, labels, np.random.default_rng(1), crop=(16, 8))
    assert out3.shape == (8, 16, 3) and lab3.shape == (8, 16)
    # flip with probability 0.8: a seeded frequency over many draws, and the flip itself mirrors
    rng = np.random.default_rng(2)
    flips = [reference_augment(frame, labels, rng, scales=(1.0,))[1][0, 0] == 3 for _ in range(2000)]
    assert abs(np.mean(flips) - 0.8) < 0.03


def _trainer(share: float | None, pasted_frames: int = 4, photos: tuple[str, ...] = ()) -> SegmentationTrainer:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 24, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 12, (4, 24, 32), dtype=np.uint8)
    data = SegmentationSet(frames, labels, tuple(f"c{i}" for i in range(K)), 11, "camvid")
    photos = photos or tuple(f"p{i}" for i in range(5))
    n = len(photos)
    # stored at 1/50 of their photo: at native size they cover a good part of the 32x24 frame
    bank = ObjectBank(tuple(np.full((20, 30, 3), 9 + i, np.uint8) for i in range(n)),
                      tuple(np.ones((20, 30), bool) for _ in range(n)), ("thing",) * n, "objects", photos,
                      (0.02,) * n)
    cfg = TrainConfig(epochs=1, batch_size=4, outlier_batch_size=pasted_frames, lr=1e-3, device="cpu",
                      paste_mode="reference", paste_share=share)
    loss = build_pixel_loss("energy-oe", num_classes=K, ignore_index=11)
    return SegmentationTrainer(SegmentationModel(_espnet(), K, 1, HEAD), data, loss, cfg, outliers=bank,
                               normalizer=Normalizer((0.1, 0.2, 0.3), (1.0, 1.0, 1.0), bgr=True))


def _draw(trainer: SegmentationTrainer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sampler = OutlierSampler(trainer._outlier_count(), trainer.cfg.outlier_batch_size, gen)
    batch = trainer._draw(torch.arange(4), gen, sampler)
    return batch.x_in, batch.y_in


def test_reference_mode_pastes_photos_into_a_share_of_the_frames_seeded() -> None:
    every = _trainer(1.0)
    assert every.fill == (76, 51, 26)  # the mean colour in RGB (the normaliser's BGR mean reversed)
    x, y = _draw(every, 0)
    assert x.shape == (4, 3, 24, 32) and y.shape == (4, 24, 32)
    pasted = (y == OUTLIER_LABEL).flatten(1).any(1)
    assert pasted.all()
    # the pasted pixels carry the object's colour, the rest of the labels stay classes or void
    assert set(torch.unique(y[~(y == OUTLIER_LABEL)]).tolist()) <= set(range(12))
    x2, y2 = _draw(_trainer(1.0), 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded
    assert not torch.equal(y, _draw(_trainer(1.0), 1)[1])
    # the share: over many batches, frames carry objects with probability 1/11 by default
    default = _trainer(None)
    gen = torch.Generator().manual_seed(3)
    sampler = OutlierSampler(default._outlier_count(), 4, gen)
    hits = [bool((default._draw(torch.arange(4), gen, sampler).y_in[i] == OUTLIER_LABEL).any())
            for _ in range(150) for i in range(4)]
    assert abs(np.mean(hits) - REFERENCE_SHARE) < 0.04
    # at most outlier_batch_size frames per batch carry objects
    _, y_one = _draw(_trainer(1.0, pasted_frames=1), 0)
    assert int((y_one == OUTLIER_LABEL).flatten(1).any(1).sum()) == 1


def test_reference_mode_pastes_all_objects_of_a_photo_together(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(1.0, pasted_frames=1, photos=("p0", "p0", "p1"))
    assert trainer._outlier_count() == 2 and trainer.photo_groups == ((0, 1), (2,))
    assert trainer.object_scale == pytest.approx(reference_object_scale((32, 24)))
    # one frame, one photo: both objects of photo p0 (colours 9 and 10), or the single object of p1 (colour 11);
    # seen before the frame is rescaled (whose bilinear resampling mixes colours at the edges)
    monkeypatch.setattr("oodtune.training.segmentation.reference_augment", lambda f, y, rng, **kw: (f, y))
    x, y = _draw(trainer, 0)
    colours = {int(c) for c in torch.unique(x.permute(0, 2, 3, 1)[y == OUTLIER_LABEL][:, 0])}
    assert colours in ({9, 10}, {11})


def test_reference_mode_needs_a_void_label_and_its_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="paste_share"):
        TrainConfig(paste_share=0.5)  # the object mode has --pasted-frames instead
    with pytest.raises(ConfigError, match="paste_mode"):
        TrainConfig(paste_mode="mosaic")
    data = SegmentationSet(np.zeros((2, 24, 32, 3), np.uint8), np.zeros((2, 24, 32), np.uint8),
                           tuple(f"c{i}" for i in range(K)), None, "novoid")
    bank = ObjectBank((np.zeros((4, 4, 3), np.uint8),), (np.ones((4, 4), bool),), ("thing",))
    cfg = TrainConfig(epochs=1, batch_size=2, outlier_batch_size=1, device="cpu", paste_mode="reference")
    with pytest.raises(DataError, match="no void label"):
        SegmentationTrainer(SegmentationModel(_espnet(), K, 1, HEAD), data,
                            build_pixel_loss("energy-oe", num_classes=K, ignore_index=None), cfg, outliers=bank)
