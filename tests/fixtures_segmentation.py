"""Tiny segmentation data sets written in their published layouts (CamVid SegNet, Road Anomaly original and
processed, Fishyscapes processed, Cityscapes gtFine, the COCO-objects mirror), and a random-weight ESPNet, for the
segmentation tests. Everything is written at test time; nothing reads the shared data folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodtune.models import build_model

W, H = 32, 24  # CamVid fixture frames (divisible by 8, as ESPNet needs)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_camvid(root: Path, frames: int = 4, seed: int = 0, size: tuple[int, int] = (W, H)) -> Path:
    """``root/camvid-segnet/{train,val,test}/fN.png`` + ``{split}annot/fN.png`` (labels 0..10, 11 = void)."""
    rng = np.random.default_rng(seed)
    base = root / "camvid-segnet"
    for split in ("train", "val", "test"):
        for i in range(frames):
            _save(base / split / f"f{i}.png", rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            _save(base / f"{split}annot" / f"f{i}.png", rng.integers(0, 12, (size[1], size[0]), dtype=np.uint8))
    return base


def anomaly_labels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A 0/1 map with one anomalous rectangle."""
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[h // 4 : h // 2, w // 4 : w // 2 + int(rng.integers(1, 4))] = 1
    return lab


def write_road_anomaly(root: Path, frames: int = 2, seed: int = 1, size: tuple[int, int] = (64, 32)
                       ) -> list[np.ndarray]:
    """The original release: ``RoadAnomaly_jpg/frame_list.json``, ``frames/NAME.jpg``,
    ``frames/NAME.labels/labels_semantic.png`` (2 = anomaly). Returns the 0/1 label maps."""
    rng = np.random.default_rng(seed)
    base = root / "RoadAnomaly_jpg"
    names, labels = [], []
    for i in range(frames):
        name = f"frame{i}.jpg"
        _save(base / "frames" / name, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        lab = anomaly_labels(rng, size[1], size[0])
        _save(base / "frames" / f"frame{i}.labels" / "labels_semantic.png", lab * 2)
        names.append(name)
        labels.append(lab)
    (base / "frame_list.json").write_text(json.dumps(names))
    return labels


def write_processed(folder: Path, labels: list[np.ndarray], seed: int = 2, suffix: str = ".png") -> None:
    """PEBAL's processed anomaly layout: ``folder/original/NAME`` + ``folder/labels/NAME.png`` (0 / 1 / 255)."""
    rng = np.random.default_rng(seed)
    for i, lab in enumerate(labels):
        _save(folder / "original" / f"x{i}{suffix}", rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8))
        _save(folder / "labels" / f"x{i}.png", lab)


def write_cityscapes(root: Path, split: str = "train", frames: int = 2, seed: int = 3) -> list[np.ndarray]:
    """``cityscapes/leftImg8bit/SPLIT/city/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelTrainIds.png``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(frames):
        stem = f"city_000000_00000{i}"
        _save(root / "cityscapes" / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png",
              rng.integers(0, 256, (16, 32, 3), dtype=np.uint8))
        lab = rng.choice(np.r_[np.arange(19), 255], size=(16, 32)).astype(np.uint8)
        _save(root / "cityscapes" / "gtFine" / split / "city" / f"{stem}_gtFine_labelTrainIds.png", lab)
        out.append(lab)
    return out


def write_objects(root: Path, train: int = 5, val: int = 3, seed: int = 4, per_photo: int = 1) -> Path:
    """The COCO-objects mirror: ``coco-mini-objects/objects.json`` + crops and 0/255 masks; ``per_photo`` objects
    share each source photo (``coco_image_id``)."""
    rng = np.random.default_rng(seed)
    base = root / "coco-mini-objects"
    entries = []
    for i, split in enumerate(["train2017"] * train + ["val2017"] * val):
        h, w = int(rng.integers(8, 20)), int(rng.integers(8, 20))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[1:-1, 2:-1] = 255
        image = _save(base / "objects" / f"o{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        mask_path = _save(base / "objects" / f"o{i}_mask.png", mask)
        entries.append({"split": split, "category": "thing", "image": str(image.relative_to(base)),
                        "mask": str(mask_path.relative_to(base)), "coco_image_id": 1000 + i // per_photo})
    (base / "objects.json").write_text(json.dumps({"objects": entries}))
    return base


def write_espnet_weights(path: Path, outputs: int = 12, arch: str = "espnet-camvid", seed: int = 0) -> Path:
    """A random-weight ESPNet state_dict saved like the published ones (a plain state_dict)."""
    torch.manual_seed(seed)
    model = build_model(arch, outputs)
    torch.save(model.state_dict(), path)
    return path


def write_segmentation_root(root: Path) -> None:
    """CamVid + Road Anomaly + object bank: everything the segmentation pipeline needs."""
    write_camvid(root)
    write_road_anomaly(root)
    write_objects(root)


class FixedSegmenter(torch.nn.Module):
    """A user segmenter that always returns 5 channels, whatever ``num_classes`` it is built with."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class TinySegmenter(torch.nn.Module):
    """A user segmenter: a conv-BN-ReLU body and a 1x1 head giving ``num_classes`` maps at the input size."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
