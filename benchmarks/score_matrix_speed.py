"""What a score × model matrix costs: wall time of ``oodtune.evaluation.evaluate`` with 10 scores on 6 OOD sets
vs 1 score, and vs scoring each of the 10 in its own ``evaluate`` call (a forward pass per score).

One randomly initialised ``--arch`` and random 32x32 uint8 images: an ID train split (``--num-train``, labelled:
the fit statistics), an ID test split (``--num-test``) and 6 OOD sets of ``--num-ood`` images. Three timed runs,
each after the same warm-up call (excluded):

* ``1 score``: evaluate(..., [energy]);
* ``10 scores, shared outputs``: one evaluate call with msp, maxlogit, energy, gen, klm, mahalanobis, knn, vim,
  react+energy, ash-s+energy — logits and features computed once per dataset and read by every score;
* ``10 scores, one call each``: the 10 scores in 10 evaluate calls (what a per-score loop costs).

With ``--select`` every run also selects the scores' hyperparameters on a validation pair (``--holdout`` ID train
images vs ``--num-ood`` random outliers). Prints seconds and the ratio to the 1-score run.

    python benchmarks/score_matrix_speed.py                 # CUDA if present (WRN-40-2, 50k train, 10k test)
    python benchmarks/score_matrix_speed.py --device cpu --arch wrn-16-1 --num-train 5000 --num-test 2000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from _common import environment, print_table, save_json, sync
from oodtune.data.imageset import ImageSet
from oodtune.data.tensors import Normalizer
from oodtune.evaluation.classification import Validation, evaluate
from oodtune.models import FeatureModel, build_model
from oodtune.scores import build_score
from oodtune.utils.runtime import resolve_device

SCORES = ["msp", "maxlogit", "energy", "gen", "klm", "mahalanobis", "knn", "vim", "react+energy", "ash-s+energy"]
OOD_SETS = 6


def random_images(n: int, seed: int, labelled: bool = False) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n) if labelled else None
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels,
                    tuple(str(c) for c in range(10)) if labelled else (), f"random-{seed}")


def timed(args: argparse.Namespace, net: FeatureModel, data: dict[str, Any], names: list[str], device: torch.device,
          calls: int = 1) -> float:
    """Seconds for ``calls`` evaluate calls that together score every name in ``names``."""
    groups = [names] if calls == 1 else [[n] for n in names]
    sync(device)
    t0 = time.perf_counter()
    for group in groups:
        evaluate(net, Normalizer(), data["test"], data["ood"], [build_score(n) for n in group], id_train=data["train"],
                 device=str(device), batch_size=args.batch_size, validation=data["validation"])
    sync(device)
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="default wrn-40-2 on CUDA, wrn-16-1 on CPU")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--num-train", type=int, default=None, help="ID train images (default 50000 CUDA, 5000 CPU)")
    ap.add_argument("--num-test", type=int, default=None, help="ID test images (default 10000 CUDA, 2000 CPU)")
    ap.add_argument("--num-ood", type=int, default=1000, help="images per OOD set (6 sets)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--select", action="store_true", help="also select hyperparameters on a validation pair")
    ap.add_argument("--holdout", type=int, default=1000, help="held-out ID train images for --select")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    cuda = device.type == "cuda"
    args.arch = args.arch or ("wrn-40-2" if cuda else "wrn-16-1")
    args.num_train = args.num_train or (50_000 if cuda else 5_000)
    args.num_test = args.num_test or (10_000 if cuda else 2_000)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = FeatureModel(build_model(args.arch, 10)).eval()
    data: dict[str, Any] = {
        "train": random_images(args.num_train, 0, labelled=True),
        "test": random_images(args.num_test, 1, labelled=True),
        "ood": {f"ood{i}": random_images(args.num_ood, 10 + i) for i in range(OOD_SETS)},
        "validation": (Validation(np.arange(args.holdout), random_images(args.num_ood, 99)) if args.select
                       else None),
    }
    warm = {"train": random_images(256, 2, labelled=True), "test": random_images(256, 3, labelled=True),
            "ood": {"w": random_images(256, 4)}, "validation": None}
    timed(args, net, warm, SCORES, device)  # warm-up (allocator, cuDNN, first-call overheads)
    one = timed(args, net, data, ["energy"], device)
    shared = timed(args, net, data, SCORES, device)
    separate = timed(args, net, data, SCORES, device, calls=len(SCORES))
    rows = [["1 score (energy)", one, 1.0], [f"{len(SCORES)} scores, shared outputs", shared, shared / one],
            [f"{len(SCORES)} scores, one call each", separate, separate / one]]
    title = (f"evaluate: {args.arch} on {args.device}, {args.num_train} train / {args.num_test} test / "
             f"{OOD_SETS} x {args.num_ood} OOD images{', with selection' if args.select else ''}")
    print_table(title, ["run", "seconds", "x 1 score"], rows)
    payload = {"benchmark": "score_matrix_speed", "args": vars(args), "environment": environment(device),
               "scores": SCORES, "seconds": {"one": one, "shared": shared, "separate": separate}}
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
