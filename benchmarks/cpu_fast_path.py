"""The CPU fast path against today's fp32 path, both in one process, their steps alternating (so a machine whose
load changes during the run slows both alike; the ratio is what counts).

* **fp32** (the path before the fast one): fp32, NCHW; segmentation runs the whole network on every frame.
* **fast**: ``--precision auto`` on this CPU (bf16 autocast + channels_last where the CPU has native bf16, see
  ``oodtune.utils.runtime``); segmentation fine-tuning reads unpasted frames' trunk output from the trunk cache
  (filled before timing: the steady state of every epoch after the first; the fill is timed separately).

Stages (``--stages``): ``pretrain`` (128 ID images per step), ``finetune`` (128 ID + 256 outliers, Energy-OE) for
each ``--archs`` (random 32x32 data: the speed does not depend on the pixels); ``predict`` (``compute_outputs``,
the forward pass of ``oodtune predict`` / ``Detector``: WRN-40-2 at 32 px, the ImageNet-form ResNet-18 at 224 px);
``segstep`` (ESPNet, PEBAL, 480x360, batch 8 with one pasted frame: PEBAL's share); ``segeval`` (Road Anomaly's
60 frames forward at the CamVid ESPNet's 480x360 input, real frames from ``--data-root`` else random ones);
``segpredict`` (the same frames through ``SegmentationDetector.predict``: what ``oodtune predict`` runs for a
segmenter, the fast path under ``--precision auto``).
Each reports the median images (frames) per second over ``--steps`` timed steps per path after ``--warmup``.

    OMP_NUM_THREADS=1 python benchmarks/cpu_fast_path.py --threads 1 --json results/speed/cpu_fast_path.json
    python benchmarks/cpu_fast_path.py --stages threads      # 1 vs 2 threads per process, alternating
    python benchmarks/cpu_fast_path.py --stages compile-pretrain --archs wrn-40-2   # eager vs torch.compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import environment, print_table, save_json
from oodtune.data.imageset import ImageSet
from oodtune.data.objects import ObjectBank
from oodtune.data.segmentation import ANOMALY_CLASSES, CAMVID_CLASSES, SegmentationSet
from oodtune.data.tensors import Normalizer
from oodtune.deploy.pixel_detector import PixelCalibration, SegmentationDetector
from oodtune.evaluation import compute_outputs
from oodtune.evaluation.segmentation import forward_maps
from oodtune.losses import build_method_loss
from oodtune.losses.pixel import build_pixel_loss
from oodtune.models import FeatureModel, SegmentationModel, build_model
from oodtune.training.config import TrainConfig
from oodtune.training.sampling import OutlierSampler
from oodtune.training.segmentation import SegmentationTrainer
from oodtune.training.trainer import Trainer
from oodtune.utils.runtime import cpu_bf16_flags, inference_precision, resolve_precision, set_threads
from predict_throughput import ImageNetResNet18

CPU = torch.device("cpu")
Step = Callable[[], int]  # one timed unit of work; returns the images it processed


def alternate(paths: dict[str, Step], warmup: int, steps: int) -> dict[str, float]:
    """Median images/s per path; the paths take turns, one step each."""
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(warmup + steps):
        for name, step in paths.items():
            t = time.perf_counter()
            n = step()
            if i >= warmup:
                rates[name].append(n / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def _images(n: int, size: int, seed: int, labelled: bool) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    if not labelled:
        return ImageSet(images, None, (), "random")
    return ImageSet(images, rng.integers(0, 10, n), tuple(str(i) for i in range(10)), "random")


def _train_step(trainer: Trainer) -> Step:
    """One training step as ``Trainer._epoch`` runs it (draw, forward + loss, backward, optimizer)."""
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(0)
    opt = trainer._optimizer()
    n_out = trainer._outlier_count()
    sampler = OutlierSampler(n_out, cfg.outlier_batch_size, gen) if n_out else None
    step_fn = trainer._step_function()
    trainer.net.train()

    def step() -> int:
        idx = torch.randint(len(trainer.train_x), (cfg.batch_size,), generator=gen)
        batch = trainer._draw(idx, gen, sampler)
        out = step_fn(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return batch.images

    return step


def train_stage(stage: str, arch: str, args: argparse.Namespace) -> dict[str, float]:
    train = _images(2048, 32, 0, True)
    outliers = _images(2048, 32, 1, False) if stage == "finetune" else None
    loss = build_method_loss("energy-oe" if outliers is not None else "ce")
    paths = {}
    for name, precision in (("fp32", "fp32"), ("fast", "auto")):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, lr=0.01, batch_size=128, outlier_batch_size=256, precision=precision,
                          device="cpu")
        paths[name] = _train_step(Trainer(FeatureModel(build_model(arch, 10)), train, loss, cfg, outliers=outliers))
    return alternate(paths, args.warmup, args.steps)


def predict_stage(name: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    if name == "resnet18-imagenet@224":
        net, ds, batch = FeatureModel(ImageNetResNet18(1000)), _images(32, 224, 2, False), 32
    else:
        net, ds, batch = FeatureModel(build_model("wrn-40-2", 10)), _images(1024, 32, 2, False), 256
    paths = {p: (lambda p=p: len(compute_outputs(net, ds, Normalizer(), device="cpu", batch_size=batch,
                                                 precision=p, show_progress=False).logits))
             for p in ("fp32", "auto")}
    return {("fp32" if k == "fp32" else "fast"): v for k, v in alternate(paths, 1, args.steps).items()}


def _espnet() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(build_model("espnet-camvid", 12), 11, 1, ("conv", "classifier"))


def _fill(trainer: SegmentationTrainer, frames: int) -> float:
    """Fill the trunk cache for ``frames`` frames x both flips; seconds per frame."""
    cache = trainer.trunk_cache
    if cache is None:
        raise SystemExit("the fast path has no trunk cache (OODTUNE_TRUNK_CACHE=0?)")
    t0 = time.perf_counter()
    for flip in (False, True):
        for start in range(0, frames, 8):
            rows = list(range(start, min(start + 8, frames)))
            x = trainer.train_x[rows]
            x = (x.flip(2) if flip else x).permute(0, 3, 1, 2).contiguous()

            def trunk(sel: list[int], x: torch.Tensor = x) -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                     enabled=trainer.precision == "bf16"):
                    return trainer.net.trunk(trainer.normalizer(x[sel]))

            cache.get(rows, [flip] * len(rows), trunk, CPU)
    return (time.perf_counter() - t0) / (2 * frames)


def segstep_stage(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n = 32
    frames = SegmentationSet(rng.integers(0, 256, (n, 360, 480, 3), dtype=np.uint8),
                             rng.integers(0, 12, (n, 360, 480), dtype=np.uint8), CAMVID_CLASSES, 11, "random-camvid")
    bank = ObjectBank(tuple(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8) for _ in range(16)),
                      tuple(np.ones((90, 60), bool) for _ in range(16)), ("x",) * 16)
    loss = build_pixel_loss("pebal", num_classes=11, ignore_index=11, m_in=-9.0, m_out=-4.0)
    paths, fill = {}, 0.0
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["OODTUNE_CACHE"] = cache_dir
        for name, precision, cache in (("fp32", "fp32", "0"), ("fast", "auto", "1")):
            os.environ["OODTUNE_TRUNK_CACHE"] = cache
            cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=8, outlier_batch_size=1, weight_decay=0.0,
                              precision=precision, device="cpu")
            trainer = SegmentationTrainer(_espnet(), frames, loss, cfg, outliers=bank, normalizer=Normalizer())
            if cache == "1":
                fill = _fill(trainer, n)
            paths[name] = _train_step(trainer)
        result = alternate(paths, args.warmup, args.steps)
    return {**result, "cache_fill_s_per_frame": fill}


def _road_frames(args: argparse.Namespace) -> SegmentationSet:
    """Road Anomaly's 60 frames at 480x360 from ``--data-root``, else 60 random frames of that size."""
    if args.data_root:
        from oodtune.pipeline import DataSource

        return DataSource(args.data_root).segmentation("road-anomaly", "test", size=(480, 360))
    rng = np.random.default_rng(0)
    return SegmentationSet(rng.integers(0, 256, (60, 360, 480, 3), dtype=np.uint8),
                           (rng.random((60, 360, 480)) < 0.1).astype(np.uint8), ANOMALY_CLASSES, 255, "random")


def segeval_stage(args: argparse.Namespace) -> dict[str, float]:
    road = _road_frames(args)
    net = _espnet()

    def run(p: str) -> int:
        for _ in forward_maps(net, road, Normalizer(), device="cpu", precision=p):
            pass
        return len(road)

    paths = {"fp32": lambda: run("fp32"), "fast": lambda: run("auto")}
    return alternate(paths, 0, max(1, args.steps // 2))


def segpredict_stage(args: argparse.Namespace) -> dict[str, float]:
    frames = _road_frames(args).images
    det = SegmentationDetector(_espnet(), classes=CAMVID_CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3,
                               input_size=(480, 360), device="cpu")
    det.calibration = PixelCalibration(threshold=0.0, tpr=0.95, achieved=0.95, n=1, data="none", held_out=True,
                                       expected=0.95, expected_std=0.0)

    def run(p: str) -> int:
        with inference_precision(p):
            for start in range(0, len(frames), 8):
                det.predict(list(frames[start : start + 8]))
        return len(frames)

    paths = {"fp32": lambda: run("fp32"), "fast": lambda: run("auto")}
    return alternate(paths, 0, max(1, args.steps // 2))


def compile_stage(stage: str, arch: str, args: argparse.Namespace) -> dict[str, float]:
    """The fast path eager vs under ``--compile default`` (inductor's C++ backend), alternating; the first
    compiled step (compilation) is reported apart."""
    train = _images(2048, 32, 0, True)
    outliers = _images(2048, 32, 1, False) if stage == "finetune" else None
    loss = build_method_loss("energy-oe" if outliers is not None else "ce")
    paths, first = {}, 0.0
    for name, mode in (("fast", "none"), ("compiled", "default")):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, lr=0.01, batch_size=128, outlier_batch_size=256, precision="auto",
                          compile=mode, device="cpu")
        paths[name] = _train_step(Trainer(FeatureModel(build_model(arch, 10)), train, loss, cfg, outliers=outliers))
        if mode != "none":
            t0 = time.perf_counter()
            paths[name]()
            first = time.perf_counter() - t0
    res = alternate(paths, args.warmup, args.steps)
    return {"fp32": res["fast"], "fast": res["compiled"], "first_compiled_step_s": first}


def threads_stage(args: argparse.Namespace) -> dict[str, float]:
    """WRN-16-1 pretraining steps (fast path) with 1 and 2 intra-op threads, alternating."""
    train = _images(2048, 32, 0, True)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=128, precision="auto", device="cpu")
    torch.manual_seed(0)
    step = _train_step(Trainer(FeatureModel(build_model("wrn-16-1", 10)), train, build_method_loss("ce"), cfg))

    def with_threads(n: int) -> Step:
        def run() -> int:
            torch.set_num_threads(n)
            return step()
        return run

    return {f"{n}_threads": v for n, v in
            alternate({"1": with_threads(1), "2": with_threads(2)}, args.warmup, args.steps).items()} | {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="pretrain,finetune,predict,segstep,segeval")
    ap.add_argument("--archs", default="wrn-16-1,wrn-40-2,resnet18")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=os.environ.get("OODTUNE_DATA"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]

    def record(stage: str, what: str, res: dict[str, float]) -> None:
        load.append(os.getloadavg()[0])
        ratio = res["fast"] / res["fp32"] if "fast" in res else res.get("2_threads", 0) / res.get("1_threads", 1)
        rows.append({"stage": stage, "what": what, **res, "ratio": ratio, "load_1min": load[-1]})
        print(f"{stage:9s} {what:22s} " + " ".join(f"{k}={v:,.2f}" for k, v in res.items())
              + f" ratio={ratio:.2f}x load={load[-1]:.2f}", flush=True)

    for stage in args.stages.split(","):
        if stage in ("pretrain", "finetune"):
            for arch in args.archs.split(","):
                record(stage, arch, train_stage(stage, arch, args))
        elif stage == "predict":
            for name in ("wrn-40-2@32", "resnet18-imagenet@224"):
                record(stage, name, predict_stage(name, args))
        elif stage == "segstep":
            record(stage, "espnet 480x360 b8/1", segstep_stage(args))
        elif stage == "segeval":
            record(stage, "road-anomaly 60@480x360", segeval_stage(args))
        elif stage == "segpredict":
            record(stage, "detector 60@480x360", segpredict_stage(args))
        elif stage in ("compile-pretrain", "compile-finetune"):
            for arch in args.archs.split(","):  # columns: eager fast path / compiled fast path
                record(stage, arch, compile_stage(stage.split("-")[1], arch, args))
        elif stage == "threads":
            record(stage, "wrn-16-1 pretrain", threads_stage(args))
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    print_table("CPU fast path vs fp32 (median img/s, same process, alternating)",
                ["stage", "what", "fp32 / 1 thr", "fast / 2 thr", "ratio", "load"],
                [[r["stage"], r["what"], r.get("fp32", r.get("1_threads")), r.get("fast", r.get("2_threads")),
                  f"{r['ratio']:.2f}x", f"{r['load_1min']:.1f}"] for r in rows])
    if args.json:
        env = environment(CPU) | {"cpu_bf16_flags": list(cpu_bf16_flags()),
                                  "fast_precision": resolve_precision(CPU, "auto"),
                                  "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
        save_json(Path(args.json), {"environment": env, "load_1min_during": load, "rows": rows})


if __name__ == "__main__":
    main()
