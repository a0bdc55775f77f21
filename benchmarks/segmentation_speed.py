"""Segmentation speed: fine-tuning frames/s, the evaluation time of Road Anomaly's 60 frames, and the time and
memory of the streaming pixel metrics on 10^8 pixels.

1. Fine-tuning (``--method``, default ``pebal``): frames/s of ``SegmentationTrainer`` steps (pasting on the CPU,
   forward over the batch, loss, backward through the trainable block, Adam) with the CamVid ESPNet architecture
   (random weights; ``--input-size``, ``--batch-size`` frames of which ``--outlier-batch-size`` get an object),
   random frames and objects; ``--warmup`` steps excluded.
2. Evaluation: seconds of ``evaluate_segmentation`` (energy score, streaming metrics and SegmentMeIfYouCan
   components) over 60 random frames at ``--ra-size`` (Road Anomaly at 640x360 by default), ID metrics on one frame.
3. Metrics: ``PixelDetectionCounter`` on ``--pixels`` float32 scores fed in chunks of 10^6 (the data are generated
   before timing), its AUROC / AP / FPR95 and their bound, plus the peak resident memory of the process and the
   counter's own arrays.

    OMP_NUM_THREADS=1 python benchmarks/segmentation_speed.py --json results/segmentation/speed.json
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from _common import environment, now, print_table, save_json
from oodtune.data.objects import ObjectBank
from oodtune.data.segmentation import ANOMALY_CLASSES, CAMVID_CLASSES, SegmentationSet
from oodtune.data.tensors import Normalizer
from oodtune.evaluation.segmentation import evaluate_segmentation
from oodtune.losses.pixel import build_pixel_loss
from oodtune.metrics.pixel import PixelDetectionCounter
from oodtune.models import SegmentationModel, build_model
from oodtune.scores import build_score
from oodtune.training.config import TrainConfig
from oodtune.training.segmentation import SegmentationTrainer
from oodtune.utils.runtime import resolve_device


def _net() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(build_model("espnet-camvid", 12), 11, 1, ("conv", "classifier"))


def _frames(n: int, size: tuple[int, int], anomaly: bool, seed: int = 0) -> SegmentationSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)
    if anomaly:
        labels = (rng.random((n, size[1], size[0])) < 0.1).astype(np.uint8)
        return SegmentationSet(images, labels, ANOMALY_CLASSES, 255, "random-anomaly")
    return SegmentationSet(images, rng.integers(0, 12, (n, size[1], size[0]), dtype=np.uint8), CAMVID_CLASSES, 11,
                           "random-camvid")


def finetune_speed(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    size = tuple(int(v) for v in args.input_size.split("x"))
    frames = _frames(max(args.batch_size * (args.steps + args.warmup), 8), size, False)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    bank = ObjectBank(tuple(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8) for _ in range(16)),
                      tuple(np.ones((60, 40), bool) for _ in range(16)), ("x",) * 16)
    prior = [1.0] * 11 if "balanced" in args.method else None
    loss = build_pixel_loss(args.method, num_classes=11, ignore_index=11, prior_gamma=prior, m_in=-9.0, m_out=-4.0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, outlier_batch_size=args.outlier_batch_size, lr=1e-3,
                      weight_decay=0.0, max_steps_per_epoch=args.warmup + args.steps, device=str(device))
    trainer = SegmentationTrainer(_net(), frames, loss, cfg, outliers=bank, normalizer=Normalizer())
    marks: list[float] = []
    draw = trainer._draw

    def timed_draw(*a: object) -> object:
        marks.append(now(device))
        return draw(*a)  # type: ignore[arg-type]

    trainer._draw = timed_draw  # type: ignore[method-assign]
    trainer.fit()
    end = now(device)
    seconds = end - marks[args.warmup]
    return {"frames_per_s": args.steps * args.batch_size / seconds, "seconds_per_step": seconds / args.steps}


def eval_speed(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    size = tuple(int(v) for v in args.ra_size.split("x"))
    road = _frames(60, size, True)  # type: ignore[arg-type]
    net = _net()
    t0 = now(device)
    evaluate_segmentation(net, Normalizer(), _frames(1, (480, 360), False), {"road-anomaly": road},
                          [build_score("energy")], device=str(device))
    return {"seconds_60_frames": now(device) - t0}


def metrics_speed(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(2)
    chunk = 10**6
    scores = rng.normal(size=chunk * 4).astype(np.float32)
    anomaly = rng.random(chunk * 4) < 0.1
    counter = PixelDetectionCounter()
    t0 = time.perf_counter()
    for i in range(args.pixels // chunk):
        j = (i % 4) * chunk
        counter.update(scores[j : j + chunk], anomaly[j : j + chunk])
    res = counter.result()
    seconds = time.perf_counter() - t0
    counter_bytes = (counter._counts.nbytes if counter._counts is not None else 0)
    return {"pixels": float(args.pixels), "seconds": seconds, "auroc": res.metrics.auroc,
            "auroc_bound": res.auroc_bound, "counter_mib": counter_bytes / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--method", default="pebal")
    parser.add_argument("--input-size", default="480x360")
    parser.add_argument("--ra-size", default="640x360")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--outlier-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pixels", type=int, default=10**8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    metrics = metrics_speed(args)  # first, so that its peak memory is its own
    train = finetune_speed(args, device)
    evaluation = eval_speed(args, device)
    print_table("segmentation speed", ["what", "value"], [
        [f"fine-tuning {args.method}, {args.input_size}, batch {args.batch_size}: frames/s", train["frames_per_s"]],
        [f"evaluation of 60 frames at {args.ra_size}: s", evaluation["seconds_60_frames"]],
        [f"pixel metrics on {args.pixels:.0e} pixels: s", metrics["seconds"]],
        ["pixel metrics: counter MiB", metrics["counter_mib"]],
        ["process peak RSS after the metrics: MiB", metrics["peak_rss_mib"]],
    ])
    save_json(args.json, {"environment": environment(device), "args": vars(args), "finetune": train,
                          "evaluation": evaluation, "metrics": metrics})


if __name__ == "__main__":
    main()
