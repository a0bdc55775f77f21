"""The published ESPNets, measured as shipped (the reload check of the data README; needs the real data).

1. The CamVid model (``espnet-camvid``, 11 classes + void) at 480x360 on CamVid test: mIoU, pixel accuracy and
   per-class IoU (void label ignored, a void prediction on a labelled pixel is an error), then its pixel energy
   (over the 11 class logits, no blur) on Road Anomaly at 640x360: AUROC, AP, FPR95 (anomaly pixels positive).
2. The Cityscapes model (``espnet``, 19 train ids + void) on Road Anomaly resized to 1024x512 (as its authors
   evaluate it), and its mIoU on CamVid test relabelled to Cityscapes train ids (``camvid-cityscapes``; the mean
   is over the classes that occur in the labels or the predictions).

    python benchmarks/segmentation_reference.py --data-root DATA --json results/segmentation/reference.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _common import environment, print_table, save_json
from oodtune import pipeline
from oodtune.data import load_segmentation
from oodtune.evaluation.segmentation import evaluate_segmentation, forward_maps
from oodtune.metrics.pixel import ConfusionCounter
from oodtune.pipeline import normalizer_for
from oodtune.scores import build_score


def measure(weights: Path, arch: str, dataset: str, input_size: tuple[int, int], ra_size: tuple[int, int],
            data_root: str, device: str) -> dict:
    """Import ``weights`` for ``dataset`` at ``input_size``; mIoU on its test split and energy on Road Anomaly."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = pipeline.import_segmenter(weights, Path(tmp) / "model.pt", arch=arch, dataset=dataset,
                                         data_root=data_root, input_size=input_size)
        net, meta, _ = pipeline.load_task_model(ckpt)
    test = load_segmentation(dataset, data_root, "test", size=input_size)
    conf = ConfusionCounter(meta.num_classes, meta.num_classes + meta.extra_channels, meta.ignore_index)
    for logits, labels in forward_maps(net, test, normalizer_for(meta), device=device):
        conf.update(logits.argmax(1).cpu().numpy(), labels)
    road = load_segmentation("road-anomaly", data_root, size=ra_size)
    report = evaluate_segmentation(net, normalizer_for(meta), test.subset([0]), {"road-anomaly": road},
                                   [build_score("energy")], device=device, components=False)
    row = report.rows[0]
    return {"arch": arch, "dataset": dataset, "input_size": list(input_size), "road_anomaly_size": list(ra_size),
            "miou": 100 * conf.miou(), "pixel_accuracy": 100 * conf.pixel_accuracy(),
            "iou": {c: 100 * v for c, v in zip(meta.classes, conf.iou().tolist(), strict=True)},
            "road_anomaly_energy": {k: row[k] for k in ("auroc", "aupr_out", "fpr95", "anomaly_pixels", "auroc_bound")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    espnet = Path(args.data_root) / "espnet"
    results = [
        measure(espnet / "espnet_p_2_q_8_camvid.pth", "espnet-camvid", "camvid", (480, 360), (640, 360),
                args.data_root, args.device),
        measure(espnet / "espnet_p_2_q_8_cityscapes.pth", "espnet", "camvid-cityscapes", (480, 360), (1024, 512),
                args.data_root, args.device),
    ]
    rows = [[r["arch"], r["dataset"], r["miou"], r["pixel_accuracy"], r["road_anomaly_energy"]["auroc"],
             r["road_anomaly_energy"]["aupr_out"], r["road_anomaly_energy"]["fpr95"]] for r in results]
    print_table("published ESPNets as shipped (%)", ["arch", "ID test set", "mIoU", "pixel acc", "RA AUROC",
                                                     "RA AP", "RA FPR95"], rows)
    print_table("per-class IoU of the CamVid model (%)", ["class", "IoU"], list(results[0]["iou"].items()))
    save_json(args.json, {"environment": environment(torch.device(args.device)), "results": results})


if __name__ == "__main__":
    main()
