"""Data sets larger than memory: peak memory and throughput of the on-disk (streamed) data path at 224 px.

A folder of generated JPEGs (224 px, 10 classes; ``benchmarks/_jpegs.py``) is written once under ``--root``; the
smaller sets are hard links to its first images. For each ``--sizes`` entry, a fresh process (so that its peak RSS
is its own) runs what a user with a big folder runs:

1. ``load_dataset("folder:...", resolution=224)``: decodes every JPEG once, streaming into the decode cache (a
   ``.npy`` on disk); the set comes back on disk (``OODTUNE_IN_MEMORY_MB=0`` forces that for every size).
2. a full read pass over every cached image in batches (what one epoch reads; no network), in images/s;
3. fine-tuning an ImageNet-form ResNet-18 (7x7/2 stem + max-pool, 4x2 basic blocks, 512-d features) with
   Energy-OE for ``--steps`` steps of one epoch (ID batches drawn from a permutation of the *whole* set, streamed
   with read-ahead; outliers: 1,024 in-memory uniform-noise images), random-resized crop + flip;
4. scoring ``--score-images`` images of the set (streamed) with MSP / energy / max-logit.

Peak RSS (``ru_maxrss``) is taken at the end of each process. With ``--compare N``, one more process times the
streamed path against the in-memory path on the first N images (a set that fits), alternating the two paths
``--repeats`` times in the same process: fine-tuning steps/s and scoring images/s.

    OMP_NUM_THREADS=1 python benchmarks/large_data.py --root /tmp/oodtune-large --sizes 10000,50000,100000 \\
        --compare 10000 --json results/large-data/cpu.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _common import environment, print_table, save_json
from _jpegs import write_jpegs

RESOLUTION = 224
CLASSES = 10
FULL = "jpeg100k"


class ImageNetResNet18(nn.Module):
    """ResNet-18 in its ImageNet form: 7x7 stride-2 stem and 3x3 max-pool before the four stages."""

    def __init__(self, num_classes: int) -> None:
        from oodtune.models.resnet import resnet18_stages

        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.stages = resnet18_stages()
        self.head = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return F.adaptive_avg_pool2d(self.stages(out), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def folder_of(root: Path, n: int) -> Path:
    """The folder of the first ``n`` generated images (hard links into the full folder)."""
    full = root / FULL
    if n == 100_000:
        return full
    out = root / f"jpeg{n}"
    for i in range(n):
        src = full / f"class{i % CLASSES:02d}" / f"{i:07d}.jpg"
        dst = out / src.parent.name / src.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    return out


def _model_and_config(steps: int, seed: int = 0) -> tuple[Any, Any]:
    from oodtune.models import FeatureModel
    from oodtune.training.config import TrainConfig

    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=16, outlier_batch_size=16, max_steps_per_epoch=steps,
                      device="cpu", seed=seed)
    return FeatureModel(ImageNetResNet18(CLASSES)), cfg


def _train(train_set: Any, outliers: Any, steps: int) -> float:
    """Steps/s of fine-tuning (Energy-OE) for ``steps`` steps, the first excluded (warm-up)."""
    from oodtune.losses import build_method_loss
    from oodtune.training.trainer import Trainer

    net, cfg = _model_and_config(steps)
    trainer = Trainer(net, train_set, build_method_loss("energy-oe"), cfg, outliers=outliers)
    marks: list[float] = []
    draw = trainer._draw

    def timed_draw(*a: Any) -> Any:
        marks.append(time.perf_counter())
        return draw(*a)

    trainer._draw = timed_draw  # type: ignore[method-assign]
    trainer.fit()
    end = time.perf_counter()
    return (len(marks) - 1) / (end - marks[1])


def _score(ds: Any, n: int) -> tuple[float, dict[str, float]]:
    """(images/s, mean score) of MSP / energy / max-logit over the first ``n`` images of ``ds``."""
    from oodtune.data.tensors import Normalizer
    from oodtune.evaluation import compute_outputs
    from oodtune.scores import build_score

    net, _ = _model_and_config(1)
    part = ds.subset(np.arange(min(n, len(ds))))
    t0 = time.perf_counter()
    out = compute_outputs(net, part, Normalizer(), device="cpu", batch_size=64, show_progress=False)
    seconds = time.perf_counter() - t0
    means = {s: float(build_score(s).from_outputs(out.logits, out.features).mean()) for s in ("msp", "energy",
                                                                                             "maxlogit")}
    return len(part) / seconds, means


def _outliers() -> Any:
    """1,024 uniform-noise uint8 images at 224 px, in memory (154 MB; generated as uint8, no float copy)."""
    from oodtune.data import ImageSet

    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 256, (1024, RESOLUTION, RESOLUTION, 3), dtype=np.uint8), None, (), "noise")


def run_scale(root: Path, n: int, steps: int, score_images: int, cache: Path) -> dict[str, Any]:
    """One size, in this process (see the module docstring)."""
    from oodtune.data import load_dataset
    from oodtune.data.diskimages import DiskImages
    from oodtune.data.streaming import DeviceImages

    folder = folder_of(root, n)
    t0 = time.perf_counter()
    ds = load_dataset(f"folder:{folder}", split="train", resolution=RESOLUTION, cache_dir=cache)
    decode_s = time.perf_counter() - t0
    assert isinstance(ds.images, DiskImages), "the set should stay on disk"
    rss_after_decode = peak_rss_gib()
    t0 = time.perf_counter()
    total = 0.0
    for batch in DeviceImages(ds.images, torch.device("cpu"), ds.name).batches(256):
        total += float(batch[:, :, ::16, ::16].float().mean())
    read_s = time.perf_counter() - t0
    steps_per_s = _train(ds, _outliers(), steps)
    score_rate, means = _score(ds, score_images)
    cache_bytes = sum(p.stat().st_size for p in (cache / "images").iterdir())
    return {"images": n, "decode_s": decode_s, "decode_images_per_s": n / decode_s, "read_images_per_s": n / read_s,
            "train_steps_per_s": steps_per_s, "train_images_per_s": steps_per_s * 32, "score_images_per_s": score_rate,
            "score_means": means, "cache_gib": cache_bytes / 2**30, "peak_rss_gib_after_decode": rss_after_decode,
            "peak_rss_gib": peak_rss_gib()}


def run_compare(root: Path, n: int, steps: int, score_images: int, repeats: int, cache: Path) -> dict[str, Any]:
    """Streamed vs in-memory on the first ``n`` images, alternating, same process."""
    from oodtune.data import ImageSet, load_dataset
    from oodtune.data.cache import images_file

    disk = load_dataset(f"folder:{folder_of(root, n)}", split="train", resolution=RESOLUTION, cache_dir=cache)
    (entry,) = (cache / "images").glob("*.npz")
    memory = ImageSet(np.load(images_file(entry)), disk.labels, disk.classes, disk.name)
    outliers = _outliers()
    rows: dict[str, list[tuple[float, float]]] = {"streamed": [], "in-memory": []}
    for _ in range(repeats):
        for path, ds in (("streamed", disk), ("in-memory", memory)):
            rows[path].append((_train(ds, outliers, steps), _score(ds, score_images)[0]))
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in rows.items()}
    return {"images": n, "repeats": rows, "median": med,
            "train_ratio": med["streamed"][0] / med["in-memory"][0],
            "score_ratio": med["streamed"][1] / med["in-memory"][1]}


def child(argv: list[str]) -> None:
    mode, root, n, steps, score_images, repeats, cache = argv
    fn = run_scale if mode == "scale" else run_compare
    args = (Path(root), int(n), int(steps), int(score_images)) + ((int(repeats),) if mode == "compare" else ())
    print(json.dumps(fn(*args, Path(cache))), flush=True)  # type: ignore[operator]


def spawn(mode: str, root: Path, n: int, args: Any) -> dict[str, Any]:
    cache = root / f"cache-{mode}-{n}"
    env = {**os.environ, "OODTUNE_IN_MEMORY_MB": "0", "OODTUNE_WORKERS": str(args.workers),
           "OODTUNE_PROGRESS": "0"}
    cmd = [sys.executable, __file__, "--child", mode, str(root), str(n), str(args.steps), str(args.score_images),
           str(args.repeats), str(cache)]
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["rm", "-rf", str(cache)], check=False)  # the cache of one size is not reused
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from _common import parser

    ap = parser(__doc__)
    ap.add_argument("--root", required=True, help="folder for the generated JPEGs and the caches (outside the repo)")
    ap.add_argument("--sizes", default="10000,50000,100000")
    ap.add_argument("--steps", type=int, default=6, help="fine-tuning steps per size (the first is warm-up)")
    ap.add_argument("--score-images", type=int, default=512)
    ap.add_argument("--compare", type=int, default=0, help="also compare streamed vs in-memory on this many images")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes")
    args = ap.parse_args()
    root = Path(args.root)
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    gen_s = write_jpegs(root / FULL, 100_000, size=RESOLUTION, classes=CLASSES)
    print(f"JPEG folder ready ({gen_s:.0f} s)", flush=True)
    results = []
    for n in sizes:
        results.append(spawn("scale", root, n, args))
        print(json.dumps(results[-1]), flush=True)
    comparison = spawn("compare", root, args.compare, args) if args.compare else None
    print_table(f"on-disk data path at {RESOLUTION} px (CPU, {torch.get_num_threads()} thread(s); fine-tuning "
                f"{args.steps} steps of 16 ID + 16 outliers)",
                ["images", "decode img/s", "read img/s", "train img/s", "score img/s", "cache GiB", "peak RSS GiB"],
                [[r["images"], r["decode_images_per_s"], r["read_images_per_s"], r["train_images_per_s"],
                  r["score_images_per_s"], r["cache_gib"], r["peak_rss_gib"]] for r in results])
    if comparison:
        med = comparison["median"]
        print_table(f"streamed vs in-memory, {comparison['images']} images (median of {args.repeats})",
                    ["path", "train steps/s", "score img/s"],
                    [[k, v[0], v[1]] for k, v in med.items()])
        print(f"ratios streamed / in-memory: train {comparison['train_ratio']:.3f}, "
              f"score {comparison['score_ratio']:.3f}")
    save_json(args.json, {"args": vars(args), "environment": environment(torch.device("cpu")),
                          "load": os.getloadavg(), "seconds": time.perf_counter() - t0, "results": results,
                          "comparison": comparison})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
