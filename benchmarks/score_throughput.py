"""Scoring throughput: ``oodtune.evaluation.compute_outputs`` images/s, and OOD-metric time on 10^6 scores.

1. Forward pass: images/s of ``compute_outputs`` (logits + penultimate features of every image, fp32 by
   default as in evaluation) over ``--num-images`` random 32x32 images with a randomly initialised
   ``--arch`` (default 100,000 on CUDA, 2,000 on CPU). Includes the uint8 host-to-device copy; one warm-up
   call on a small set is excluded.
2. Metrics (CPU, numpy): seconds for AUROC + AUPR-In + AUPR-Out + FPR95 on ``--num-scores`` scores (half ID,
   half OOD, continuous) with ``oodtune.metrics.ood_metrics`` vs scikit-learn (``roc_auc_score``,
   ``average_precision_score`` twice, ``roc_curve`` for FPR95), best of ``--repeats``; the values are
   cross-checked.

    python benchmarks/score_throughput.py                 # CUDA if present
    python benchmarks/score_throughput.py --device cpu --num-images 2000 --json bench/score.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from _common import environment, now, parse_with_device, parser, print_table, save_json
from oodtune.data.imageset import ImageSet
from oodtune.data.tensors import Normalizer
from oodtune.evaluation.classification import compute_outputs
from oodtune.metrics import ood_metrics
from oodtune.models import FeatureModel, build_model


def random_images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), None, (), f"random-{n}")


def forward_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """images/s of compute_outputs over args.num_images images (after a small warm-up call)."""
    torch.manual_seed(0)
    net = FeatureModel(build_model(args.arch, 10))
    norm = Normalizer()
    data = random_images(args.num_images)
    compute_outputs(net, random_images(min(args.batch_size * 2, args.num_images), seed=1), norm, device=device,
                    batch_size=args.batch_size, precision=args.precision)  # warm-up (cuDNN, allocator)
    t0 = now(device)
    out = compute_outputs(net, data, norm, device=device, batch_size=args.batch_size, precision=args.precision)
    seconds = now(device) - t0
    assert out.logits.shape[0] == args.num_images
    return {"images": args.num_images, "seconds": seconds, "images_per_s": args.num_images / seconds}


def _best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def sklearn_metrics(s_id: np.ndarray, s_ood: np.ndarray) -> dict[str, float]:
    """The same four numbers with scikit-learn, OOD as the positive class (oodtune's default convention)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.concatenate([s_id, s_ood])
    is_id = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
    fpr, tpr, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return {"auroc": roc_auc_score(is_id, scores), "aupr_in": average_precision_score(is_id, scores),
            "aupr_out": average_precision_score(1 - is_id, -scores),
            "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}


def metric_timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    half = args.num_scores // 2
    s_id, s_ood = rng.normal(1.0, 1.0, half), rng.normal(0.0, 1.0, args.num_scores - half)
    t_ours, ours = _best_of(args.repeats, lambda: ood_metrics(s_id, s_ood))
    rows = [{"impl": "oodtune.metrics.ood_metrics", "seconds": t_ours,
             "values": {k: getattr(ours, k) for k in ("auroc", "aupr_in", "aupr_out", "fpr95")}}]
    try:
        t_sk, sk = _best_of(args.repeats, lambda: sklearn_metrics(s_id, s_ood))
    except ImportError:
        print("scikit-learn is not installed; skipping the comparison")
        return rows
    rows.append({"impl": "scikit-learn", "seconds": t_sk, "values": sk})
    rows[0]["max_abs_diff_vs_sklearn"] = max(abs(rows[0]["values"][k] - sk[k]) for k in sk)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--arch", default="wrn-40-2")
    ap.add_argument("--num-images", type=int, default=None, help="default 100000 on CUDA, 2000 on CPU")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--num-scores", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-forward", action="store_true", help="only time the metrics")
    return parse_with_device(ap, argv, (100_000, 2_000))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    payload: dict[str, Any] = {"benchmark": "score_throughput", "args": vars(args), "environment": environment(device)}
    if not args.skip_forward:
        fwd = forward_throughput(args, device)
        payload["forward"] = fwd
        print_table(f"compute_outputs: {args.arch}, {args.precision}, batch {args.batch_size}, on {args.device}",
                    ["images", "seconds", "images/s"], [[fwd["images"], fwd["seconds"], fwd["images_per_s"]]])
    rows = metric_timing(args)
    payload["metrics"] = rows
    base = rows[-1]["seconds"]
    print_table(f"AUROC + AUPR-In + AUPR-Out + FPR95 on {args.num_scores:,} scores (CPU, best of {args.repeats})",
                ["implementation", "seconds", "speed-up vs sklearn", "AUROC", "FPR95"],
                [[r["impl"], r["seconds"], f"{base / r['seconds']:.2f}x", f"{r['values']['auroc']:.6f}",
                  f"{r['values']['fpr95']:.6f}"] for r in rows])
    if "max_abs_diff_vs_sklearn" in rows[0]:
        print(f"max |oodtune - sklearn| over the four metrics: {rows[0]['max_abs_diff_vs_sklearn']:.2e}")
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
