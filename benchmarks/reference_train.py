"""Accuracy of the reference-style loop: pretrain with it to the end, then measure test accuracy.

Issue "Speed" asks that oodtune's fast path leave accuracy unchanged: its 100-epoch WRN-40-2 CIFAR-10
pretraining must reach at least the reference loop's test accuracy minus 0.3 points. This script trains the
same setup as ``oodtune pretrain`` (architecture, dropout, CE loss, SGD lr 0.1 with Nesterov momentum 0.9 and
weight decay 5e-4, per-step cosine schedule, batch 128, crop + flip, seed-determined initial weights) with the
reference-style loop of ``_reference.py`` instead of oodtune's ``Trainer``: a ``DataLoader`` with per-image
CPU augmentation and fp32 on the device.

``OUT/model.pt`` is an ordinary oodtune checkpoint, so ``oodtune evaluate OUT/model.pt --ood ...`` scores it
like any other. State is written atomically after every epoch (``OUT/last.pt``); the same command started
again resumes there, so a 100-epoch run can span several short GPU calls. Once ``OUT/model.pt`` exists
the command only evaluates it.

    python benchmarks/reference_train.py --data-root DATA --out runs/reference --json results/speed/ref.json
    python benchmarks/reference_train.py --data-root DATA --arch wrn-16-1 --epochs 2 --num-train 2000 \\
        --device cpu --out /tmp/ref
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from _common import environment, now, print_table, save_json
from _reference import reference_loader, reference_optimizer, reference_step
from oodtune.losses.terms import build_method_loss
from oodtune.models.checkpoint import read_checkpoint, read_meta, save_checkpoint
from oodtune.pipeline import id_test_accuracy, pretrain_setup
from oodtune.utils.runtime import resolve_device

LAST, FINAL = "last.pt", "model.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True, help="folder with CIFAR-10 (or --dataset) in its published format")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--arch", default="wrn-40-2")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-train", type=int, default=None, help="seeded subsample of the train split (CPU trials)")
    ap.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--out", required=True, help="run folder (last.pt for resuming, model.pt at the end)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    args.num_workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    return args


def train(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    """Run (or resume) the reference-style pretraining until ``OUT/model.pt`` exists."""
    meta, train_set, net = pretrain_setup(dataset=args.dataset, arch=args.arch, data_root=args.data_root,
                                          num_train=args.num_train, seed=args.seed)
    settings = {k: getattr(args, k) for k in ("dataset", "arch", "epochs", "lr", "batch_size", "seed", "num_train")}
    net = net.to(device).train()
    loss = build_method_loss("ce", check_finite=False)  # checked once per epoch, like oodtune's GPU path
    steps = len(train_set) // args.batch_size
    opt, sched = reference_optimizer(net, args.lr, steps * args.epochs)
    start, history = 0, []
    if (out / LAST).exists():
        ckpt = read_checkpoint(out / LAST)
        state = ckpt["train_state"]
        if state["settings"] != settings:
            raise SystemExit(f"{out / LAST} was written with {state['settings']}, not {settings}; use a new --out.")
        net.model.load_state_dict(ckpt["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start, history = int(state["epoch"]), list(state["history"])
        print(f"resuming {out} after epoch {start}", flush=True)
    torch.backends.cudnn.benchmark = True  # as in the OE/Energy training scripts
    for epoch in range(start, args.epochs):
        # Shuffle and worker augmentation seeds come from (seed, epoch), so a resumed run sees the same batches.
        loader = reference_loader(train_set, args.batch_size, args.num_workers, device,
                                  generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        t0 = now(device)
        for x, y in loader:
            y = y.to(device, non_blocking=True)  # once: reference_step's own copy is then a no-op
            total, logits = reference_step(net, loss, opt, sched, x, y, None, device)
            loss_sum += total
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        seconds = now(device) - t0
        if not torch.isfinite(loss_sum):
            raise SystemExit(f"non-finite loss in epoch {epoch + 1}")
        history.append({"epoch": epoch + 1, "ce": float(loss_sum) / steps, "train_acc": float(correct) / seen,
                        "seconds": seconds, "images_per_s": seen / seconds})
        print(f"epoch {epoch + 1}/{args.epochs} ce={history[-1]['ce']:.4f} train_acc={history[-1]['train_acc']:.4f} "
              f"({history[-1]['images_per_s']:,.0f} img/s, {seconds:.1f}s)", flush=True)
        state = {"epoch": epoch + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "history": history, "settings": settings,
                 **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        save_checkpoint(out / LAST, net, meta, train_state=state)
    save_checkpoint(out / FINAL, net, meta.replace(train_config=settings, history=tuple(history),
                                                   notes={"loop": "reference-style (benchmarks/_reference.py)"}))
    (out / LAST).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not (out / FINAL).exists():
        train(args, device, out)
    meta = read_meta(out / FINAL)
    acc = id_test_accuracy(out / FINAL, data_root=args.data_root, device=args.device)
    history = list(meta.history)
    train_s = sum(h["seconds"] for h in history)
    print_table(f"reference-style loop, {meta.arch} on {meta.dataset}, {len(history)} epochs on {args.device}",
                ["test accuracy %", "training s", "mean images/s"],
                [[100 * acc, train_s, sum(h["images_per_s"] for h in history) / len(history)]])
    payload = {"benchmark": "reference_train", "args": vars(args), "environment": environment(device),
               "checkpoint": str(out / FINAL), "test_accuracy": acc, "training_seconds": train_s,
               "wall_s": time.perf_counter() - t, "history": history}
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
