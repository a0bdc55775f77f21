"""Training throughput: oodtune's ``Trainer`` vs a reference-style DataLoader loop (the speed benchmark).

Both paths train the same architecture with the same SGD settings and the same loss code, in the same
process, on CIFAR-10-sized data (real CIFAR-10 with ``--data-root``, else random uint8 of that shape):

* **oodtune**: ``oodtune.training.trainer.Trainer`` with ``max_steps_per_epoch`` — uint8 images resident on
  the device, batched crop+flip there, bf16 autocast + channels_last on CUDA, optional ``torch.compile``.
* **reference**: what the OE / Energy reference code does — ``torch.utils.data.DataLoader`` over a Dataset
  that augments each uint8 image on the CPU (random crop with 4-px zero padding + horizontal flip), scales
  it to [0, 1] and normalises it, ``num_workers`` worker processes, fp32, ``cudnn.benchmark = True``.

Pretraining feeds ID batches only (128); fine-tuning feeds ID 128 + outliers 256 through one forward pass
(``--method``, default energy-oe). Throughput counts every image that goes through the network. The first
``--warmup`` steps (compilation, cuDNN autotuning, worker start-up) are excluded and CUDA is synchronised
around the timed window.

    python benchmarks/train_throughput.py                      # CUDA if present, else a short CPU run
    python benchmarks/train_throughput.py --device cpu --steps 3 --warmup 1
    python benchmarks/train_throughput.py --compile max-autotune --json bench/train.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from _common import environment, now, print_table, save_json
from _reference import reference_loader, reference_optimizer, reference_step
from oodtune.data.imageset import ImageSet
from oodtune.losses.terms import CompositeLoss, build_method_loss
from oodtune.models import FeatureModel, build_model
from oodtune.training.config import COMPILE_MODES, COMPILE_SCOPES, TrainConfig
from oodtune.training.trainer import Trainer
from oodtune.utils.runtime import resolve_device

NUM_CLASSES = 10
CIFAR_TRAIN_SHAPE = (50_000, 32, 32, 3)


# ----------------------------------------------------------------------------------------------- data
def random_imageset(n: int, *, labelled: bool, seed: int, name: str) -> ImageSet:
    """``n`` random uint8 32x32 RGB images (CIFAR-sized), labelled uniformly over 10 classes or unlabelled."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *CIFAR_TRAIN_SHAPE[1:]), dtype=np.uint8)
    if not labelled:
        return ImageSet(images, None, (), name)
    return ImageSet(images, rng.integers(0, NUM_CLASSES, n), tuple(f"class{i}" for i in range(NUM_CLASSES)), name)


def load_data(args: argparse.Namespace) -> tuple[ImageSet, ImageSet]:
    """(ID training set, auxiliary outlier set)."""
    if args.data_root:
        from oodtune.data import load_dataset

        train = load_dataset("cifar10", args.data_root, "train")
    else:
        train = random_imageset(args.num_images, labelled=True, seed=0, name="random-cifar10")
    outliers = random_imageset(args.num_outliers, labelled=False, seed=1, name="random-outliers")
    return train, outliers


def method_loss(method: str, check_finite: bool = True) -> CompositeLoss:
    """``build_method_loss(method)``; Balanced Energy gets a uniform class prior (the prior does not affect speed)."""
    prior = [1.0 / NUM_CLASSES] * NUM_CLASSES if "balanced" in method else None
    return build_method_loss(method, prior_gamma=prior, check_finite=check_finite)


def fresh_model(arch: str, device: torch.device) -> FeatureModel:
    """The same initial weights for both paths."""
    torch.manual_seed(0)
    return FeatureModel(build_model(arch, NUM_CLASSES)).to(device)


# ---------------------------------------------------------------------------------------- oodtune path
class _StartTimerAt:
    """Wraps ``Trainer._draw`` (the eager start of every step, outside any compiled graph) and records a
    synchronised timestamp when step ``first_timed_step`` begins."""

    def __init__(self, draw: Callable[..., Any], device: torch.device, first_timed_step: int) -> None:
        self.draw, self.device, self.first_timed_step = draw, device, first_timed_step
        self.calls = 0
        self.t0: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls == self.first_timed_step:
            self.t0 = now(self.device)
        self.calls += 1
        return self.draw(*args, **kwargs)


def run_oodtune(args: argparse.Namespace, device: torch.device, train: ImageSet, outliers: ImageSet | None,
                loss: CompositeLoss) -> dict[str, float]:
    """Time ``args.steps`` steps of ``Trainer`` after ``args.warmup`` warm-up steps (one call of ``fit``)."""
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, outlier_batch_size=args.outlier_batch_size,
                      compile=args.compile, compile_scope=args.compile_scope, precision=args.precision,
                      device=str(device),
                      max_steps_per_epoch=args.warmup + args.steps)
    trainer = Trainer(fresh_model(args.arch, device), train, loss, cfg, outliers=outliers)
    if trainer.steps_per_epoch() < args.warmup + args.steps:
        raise SystemExit(f"{len(train)} images give only {trainer.steps_per_epoch()} steps; lower --steps/--warmup")
    timer = _StartTimerAt(trainer._draw, device, args.warmup)
    trainer._draw = timer  # type: ignore[method-assign]
    trainer.fit()
    t1 = now(device)
    assert timer.t0 is not None
    per_step = args.batch_size + (args.outlier_batch_size if outliers is not None else 0)
    return _rates(args.steps, per_step, t1 - timer.t0)


# -------------------------------------------------------------------------------------- reference path
def _endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def run_reference(args: argparse.Namespace, device: torch.device, train: ImageSet, outliers: ImageSet | None,
                  loss: CompositeLoss) -> dict[str, float]:
    """Time the reference-style loop (``_reference.py``): zip(ID loader, outlier loader) -> cat -> fp32 step."""
    torch.backends.cudnn.benchmark = True  # as in the OE/Energy training scripts
    net = fresh_model(args.arch, device).train()
    total = args.warmup + args.steps
    opt, sched = reference_optimizer(net, 0.1, total)
    id_batches = _endless(reference_loader(train, args.batch_size, args.num_workers, device))
    out_batches = (_endless(reference_loader(outliers, args.outlier_batch_size, args.num_workers, device))
                   if outliers is not None else None)
    t0 = 0.0
    for step in range(total):
        if step == args.warmup:
            t0 = now(device)
        x, y = next(id_batches)
        reference_step(net, loss, opt, sched, x, y, next(out_batches)[0] if out_batches is not None else None, device)
    t1 = now(device)
    per_step = args.batch_size + (args.outlier_batch_size if outliers is not None else 0)
    return _rates(args.steps, per_step, t1 - t0)


def _rates(steps: int, images_per_step: int, seconds: float) -> dict[str, float]:
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "images_per_s": steps * images_per_step / seconds}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="wrn-40-2")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--data-root", default=None, help="read real CIFAR-10 (train) from here; default random data")
    ap.add_argument("--num-images", type=int, default=CIFAR_TRAIN_SHAPE[0], help="random ID images (no --data-root)")
    ap.add_argument("--num-outliers", type=int, default=50_000, help="random auxiliary outlier images")
    ap.add_argument("--stages", default="pretrain,finetune", help="comma list of pretrain, finetune")
    ap.add_argument("--paths", default="oodtune,reference", help="comma list of oodtune, reference")
    ap.add_argument("--method", default="energy-oe", help="fine-tuning loss (oodtune.losses.build_method_loss)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--outlier-batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", default="none", choices=COMPILE_MODES, help="torch.compile mode for the oodtune path")
    ap.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES,
                    help="what --compile wraps on the oodtune path: the model, or the whole step")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="oodtune path precision")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="also enable cudnn.benchmark for the oodtune path (the reference path always has it)")
    ap.add_argument("--no-check-finite", action="store_true",
                    help="build the loss with check_finite=False (no per-step device sync), both paths")
    ap.add_argument("--num-workers", type=int, default=None, help="reference DataLoader workers (4 CUDA / 0 CPU)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = str(device)
    args.steps = args.steps if args.steps is not None else (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    train, outliers = load_data(args)
    runners = {"oodtune": run_oodtune, "reference": run_reference}
    results: list[dict[str, Any]] = []
    for stage in args.stages.split(","):
        loss = method_loss(args.method if stage == "finetune" else "ce", check_finite=not args.no_check_finite)
        aux = outliers if stage == "finetune" else None
        for path in args.paths.split(","):
            t = time.perf_counter()
            res = runners[path](args, device, train, aux, loss)
            results.append({"stage": stage, "path": path, **res, "wall_s": time.perf_counter() - t})
            print(f"{stage:9s} {path:9s} {res['images_per_s']:,.1f} img/s", flush=True)
    ref = {r["stage"]: r["images_per_s"] for r in results if r["path"] == "reference"}
    for r in results:
        r["ratio_vs_reference"] = r["images_per_s"] / ref[r["stage"]] if r["stage"] in ref else None
    extra = "".join([f", compile={args.compile} ({args.compile_scope})" if args.compile != "none" else "",
                     ", cudnn.benchmark" if args.cudnn_benchmark else "",
                     ", check_finite=False" if args.no_check_finite else ""])
    print_table(
        f"{args.arch} training throughput on {args.device} ({args.steps} timed steps after {args.warmup} warm-up; "
        f"ID batch {args.batch_size}, outliers {args.outlier_batch_size}, method {args.method}{extra})",
        ["stage", "path", "images/s", "steps/s", "ratio vs reference"],
        [[r["stage"], r["path"], r["images_per_s"], r["steps_per_s"],
          "-" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x"] for r in results],
    )
    payload = {"benchmark": "train_throughput", "args": vars(args), "environment": environment(device),
               "data": train.name, "results": results}
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
