"""Segmentation schedule cost: seconds per fine-tuning step for each trained part and pasting mode, and the
projected wall time of full-resolution runs (PEBAL's 40 epochs over CamVid's 367 train frames = 40 x 45 = 1,800
steps of 8 frames; Balanced PEBAL's 20 epochs = 900 steps; a 10-epoch validation run = 450 steps; PEBAL's literal
16,360 steps = 40 x 409 batches of Cityscapes + 10 % COCO).

Each configuration is a ``SegmentationTrainer`` on the CamVid ESPNet architecture (random weights) with random
frames and objects at ``--input-size``, batch ``--batch-size``; the configurations are stepped in turn
(round-robin: one step of each, ``--steps`` rounds after ``--warmup`` rounds), so that the machine's load falls on
all of them alike. A step is what the training loop does: draw (pasting and augmentation on the CPU), forward
(with the trunk cache where it applies: last-block training with object pasting), loss, backward, Adam.

    OMP_NUM_THREADS=1 python benchmarks/segmentation_schedule.py --json results/segmentation/schedule-speed.json

``--malloc keep`` (the default, as the command line does) keeps freed memory in the process
(:func:`oodtune.utils.memory.keep_freed_memory`); ``--malloc default`` leaves glibc's policy
(``benchmarks/cpu_allocator.py`` compares the two).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from _common import environment, now, print_table, save_json
from oodtune.data.objects import ObjectBank
from oodtune.data.tensors import Normalizer
from oodtune.losses.pixel import build_pixel_loss
from oodtune.models import SegmentationModel, build_model, resolve_train_part
from oodtune.training.config import TrainConfig
from oodtune.training.sampling import OutlierSampler
from oodtune.training.segmentation import SegmentationTrainer
from oodtune.utils.memory import keep_freed_memory
from oodtune.utils.runtime import resolve_device
from segmentation_speed import _frames

HEAD = ("conv", "classifier")
#: (label, train_part, paste_mode, outlier_batch_size, precision: None = --precision). Under CPU bf16 the decoder
#: and the whole network train in the contiguous format (``runtime.channels_last_for_training``: their dilated
#: convolutions); the whole network is also timed in fp32, the baseline bf16 is measured against.
CONFIGS = (("head, object", "head", "object", 1, None), ("head, reference", "head", "reference", 8, None),
           ("decoder, object", "decoder", "object", 1, None), ("decoder, reference", "decoder", "reference", 8, None),
           ("all, reference", "all", "reference", 8, None), ("all in fp32, reference", "all", "reference", 8, "fp32"))
#: Steps of the full-resolution runs whose cost is projected.
SCHEDULES = {"40 epochs (1,800 steps)": 1800, "20 epochs (900 steps)": 900, "10 epochs (450 steps)": 450,
             "PEBAL's literal 16,360 steps": 16360}


def _trainer(part: str, mode: str, pasted: int, precision: str | None, args: argparse.Namespace,
             device: torch.device) -> SegmentationTrainer:
    size = tuple(int(v) for v in args.input_size.split("x"))
    frames = _frames(args.frames, size, False)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    n = 16  # objects (one photo each), a COCO-like 160x120 crop stored at native size
    bank = ObjectBank(tuple(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(n)),
                      tuple(np.ones((120, 160), bool) for _ in range(n)), ("x",) * n, "objects",
                      tuple(f"p{i}" for i in range(n)), (1.0,) * n)
    torch.manual_seed(0)
    model = build_model("espnet-camvid", 12)
    net = SegmentationModel(model, 11, 1, resolve_train_part(model, "espnet-camvid", part, HEAD))
    loss = build_pixel_loss("pebal", num_classes=11, ignore_index=11, m_in=-9.0, m_out=-4.0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, outlier_batch_size=pasted, lr=1e-5, weight_decay=0.0,
                      device=str(device), precision=precision or args.precision, paste_mode=mode,
                      paste_share=None if mode == "object" else args.paste_share)
    return SegmentationTrainer(net, frames, loss, cfg, outliers=bank, normalizer=Normalizer())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--input-size", default="480x360")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="training frames (few: the trunk cache warms up fast)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--paste-share", type=float, default=1 / 11)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4, help="rounds before timing (fills the trunk cache)")
    ap.add_argument("--only", nargs="*", default=None, choices=[c[0] for c in CONFIGS],
                    help="labels of the configurations to time")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep freed memory in the process (as the command line does) or glibc's default policy")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.malloc == "keep":
        keep_freed_memory()
    device = resolve_device(args.device)
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("OODTUNE_CACHE", cache)  # the trunk cache of random weights: thrown away after
        trainers = {label: _trainer(part, mode, pasted, precision, args, device)
                    for label, part, mode, pasted, precision in configs}
        state = {}
        for label, tr in trainers.items():
            gen = torch.Generator().manual_seed(0)
            sampler = OutlierSampler(tr._outlier_count(), tr.cfg.outlier_batch_size, gen)
            state[label] = (gen, sampler, tr._optimizer())
            tr.net.train()
        seconds: dict[str, list[float]] = {label: [] for label in trainers}
        last_loss: dict[str, float] = {}
        for round_ in range(args.warmup + args.steps):
            for label, tr in trainers.items():
                gen, sampler, opt = state[label]
                t0 = now(device)
                idx = torch.randperm(args.frames, generator=gen)[: args.batch_size]
                out = tr._forward(tr.net, tr._draw(idx, gen, sampler))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                last_loss[label] = out.loss.item()
                if round_ >= args.warmup:
                    seconds[label].append(now(device) - t0)
    key = {label: f"{label} ({tr.precision})" for label, tr in trainers.items()}  # the labels of the results
    per_step = {key[label]: float(np.mean(s)) for label, s in seconds.items()}
    load = os.getloadavg()
    rows = [[label, per_step[label], *(per_step[label] * steps / 3600 for steps in SCHEDULES.values())]
            for label in per_step]
    print_table(f"segmentation step, {args.input_size}, batch {args.batch_size}, PEBAL (load {load[0]:.1f})",
                ["configuration", "s/step", *(f"h: {k}" for k in SCHEDULES)], rows)
    save_json(args.json, {"environment": environment(device), "args": vars(args), "loadavg": list(load),
                          "seconds_per_step": per_step, "steps": SCHEDULES,
                          "last_loss": {key[label]: v for label, v in last_loss.items()},
                          "parameter_sum": {key[label]: sum(p.double().sum().item() for p in
                                                            tr.net.trainable_parameters())
                                            for label, tr in trainers.items()},
                          "hours": {label: {k: per_step[label] * v / 3600 for k, v in SCHEDULES.items()}
                                    for label in per_step}})


if __name__ == "__main__":
    main()
