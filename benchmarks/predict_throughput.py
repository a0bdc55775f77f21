"""Prediction throughput: images/s of ``Detector.predict_files`` (decode + resize + forward + score, what
``oodtune predict`` runs) and of ``Detector.predict`` on decoded images (the model alone), for two models:

* ``wrn-40-2`` at 32 px (the CIFAR-10 model of the papers), on 32x32 PNG files;
* an ImageNet-style ResNet-18 (7x7/2 stem + max-pool, 1000 classes, 1.8 GFLOPs per image) at 224 px, on
  320x240 JPEG files (resized on the shorter side to 224 and centre-cropped).

Weights are random (speed does not depend on them); images are random noise written once to a temporary
folder (noise compresses badly, so the JPEGs are larger and slower to decode than photographs). One warm-up
call per model is excluded. Decoding uses ``--workers`` threads (default: oodtune's, the CPU count up to 8).

    python benchmarks/predict_throughput.py                                  # CUDA if present
    python benchmarks/predict_throughput.py --device cpu --num-images 256 --json results/speed/cpu_predict.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from _common import environment, now, parse_with_device, parser, print_table, save_json
from oodtune.deploy.detector import Detector
from oodtune.models import build_model
from oodtune.models.resnet import resnet18_stages


class ImageNetResNet18(nn.Module):
    """ResNet-18 in its ImageNet form (He et al. 2016): 7x7/2 convolution + 3x3/2 max-pool stem, then the same
    basic blocks as oodtune's CIFAR ResNet-18 (:mod:`oodtune.models.resnet`)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.stages = resnet18_stages()
        self.head = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


MODELS = {
    "wrn-40-2@32": {"build": lambda: build_model("wrn-40-2", 10), "classes": 10, "resolution": 32,
                    "file_size": (32, 32), "suffix": ".png"},
    "resnet18-imagenet@224": {"build": lambda: ImageNetResNet18(1000), "classes": 1000, "resolution": 224,
                              "file_size": (320, 240), "suffix": ".jpg"},
}


def write_files(folder: Path, n: int, size: tuple[int, int], suffix: str) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def measure(name: str, args: argparse.Namespace, device: torch.device, folder: Path) -> dict[str, Any]:
    spec = MODELS[name]
    torch.manual_seed(0)
    det = Detector(spec["build"](), classes=[str(i) for i in range(spec["classes"])], mean=(0.5,) * 3,
                   std=(0.25,) * 3, resolution=spec["resolution"], score="energy", device=str(device))
    sub = folder / name
    sub.mkdir()
    write_files(sub, args.num_images, spec["file_size"], spec["suffix"])
    warm = np.zeros((min(args.batch_size, 8), spec["resolution"], spec["resolution"], 3), np.uint8)
    det.predict(warm, batch_size=args.batch_size)  # warm-up: allocator, cuDNN
    t0 = now(device)
    rows = list(det.predict_files([sub], batch_size=args.batch_size, workers=args.workers))
    files_s = now(device) - t0
    assert len(rows) == args.num_images and not any(r["error"] for r in rows)
    decoded = np.random.default_rng(1).integers(0, 256, (args.num_images, spec["resolution"], spec["resolution"], 3),
                                                dtype=np.uint8)
    t0 = now(device)
    det.predict(decoded, batch_size=args.batch_size)
    model_s = now(device) - t0
    return {"model": name, "images": args.num_images, "files_s": files_s, "files_per_s": args.num_images / files_s,
            "model_s": model_s, "model_per_s": args.num_images / model_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--num-images", type=int, default=None, help="default 20000 on CUDA, 256 on CPU")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: oodtune's)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    return parse_with_device(ap, argv, (20_000, 256))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    payload: dict[str, Any] = {"benchmark": "predict_throughput", "args": vars(args),
                               "environment": environment(device), "results": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result = measure(name, args, device, Path(tmp))
            payload["results"].append(result)
            print(f"{name}: {result['files_per_s']:,.1f} files/s, {result['model_per_s']:,.1f} images/s (model)")
    payload["wall_s"] = time.perf_counter() - start
    print_table(f"Detector prediction on {args.device} ({args.num_images} images, batch {args.batch_size}, energy)",
                ["model", "files/s (decode+model)", "images/s (model only)"],
                [[r["model"], r["files_per_s"], r["model_per_s"]] for r in payload["results"]])
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
