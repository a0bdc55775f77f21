#!/usr/bin/env bash
# A calibrated segmentation detector writing anomaly maps, on real data (run by scripts/demo.sh; usable alone once
# scripts/setup.sh has run):
# 1. import the published CamVid ESPNet (prints its CamVid test mIoU);
# 2. calibrate a pixel threshold accepting 95% of the non-void pixels of the CamVid validation frames, checked on
#    the CamVid test frames, and export it as a torch.export program;
# 3. predict on Road Anomaly frames (JPEG files as a user has them): anomaly map, mask, overlay and one JSON Lines
#    row per frame; then check that the exported program gives the Python detector's maps on those frames.
# Data root: $OODTUNE_DATA, else ../shared/data. Output folder: the first argument, else runs/segmentation-deploy.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${OODTUNE_DATA:-../shared/data}
OUT=${1:-runs/segmentation-deploy}
OOD=.venv/bin/oodtune
FRAMES=${SEG_DEMO_FRAMES:-6}
mkdir -p "$OUT"

[ -f "$OUT/seg.pt" ] || "$OOD" import-model "$DATA/espnet/espnet_p_2_q_8_camvid.pth" --arch espnet-camvid \
  --dataset camvid --data-root "$DATA" --out "$OUT/seg.pt" --precision fp32
"$OOD" calibrate "$OUT/seg.pt" --data-root "$DATA" --score energy --tpr 0.95 --out "$OUT/detector.json" \
  --export "$OUT/detector.pt2" --plot "$OUT/calibration.png" --overwrite

# Road Anomaly frames as files, from the data root's folder or archive
rm -rf "$OUT/frames" "$OUT/maps"
.venv/bin/python - "$DATA" "$OUT/frames" "$FRAMES" <<'PY'
import sys
import tarfile
from pathlib import Path

root, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True)
folder = root / "RoadAnomaly_jpg" / "frames"
if folder.is_dir():
    for path in sorted(folder.glob("*.jpg"))[:count]:
        (out / path.name).write_bytes(path.read_bytes())
else:
    with tarfile.open(root / "road-anomaly.tar.gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)[:count]
        for m in members:
            (out / Path(m.name).name).write_bytes(tf.extractfile(m).read())
PY
"$OOD" predict "$OUT/seg.pt" "$OUT/frames" --detector "$OUT/detector.json" --out "$OUT/maps"

.venv/bin/python - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
import torch

from oodtune.deploy.export import load_exported
from oodtune.deploy.pixel_detector import SegmentationDetector

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "maps" / "predictions.jsonl").read_text().splitlines()]
print("\nPer frame (maps/predictions.jsonl has every field):")
for r in rows:
    top = max(r["class_pixels"], key=r["class_pixels"].get)
    print(f"  {Path(r['path']).name:22s} {100 * r['anomalous_share']:5.1f}% anomalous pixels, "
          f"{r['components']:3d} components (largest {max(r['component_pixels'], default=0)} px), mostly {top}")
det = SegmentationDetector.load(out / "detector.json", out / "seg.pt", device="cpu")
program, _ = load_exported(out / "detector.pt2")
frames = det.frames([r["path"] for r in rows])
python = det.predict(frames)
with torch.no_grad():
    classes, anomaly, mask = program(torch.from_numpy(np.stack(frames)))
diff = float(np.abs(anomaly.numpy() - np.stack([p.anomaly for p in python])).max())
same_classes = bool(np.array_equal(classes.numpy(), np.stack([p.class_map for p in python])))
flips = int((mask.numpy() != np.stack([p.mask for p in python])).sum())
print(f"Exported program vs Python detector on these {len(frames)} frames: class maps identical: {same_classes}; "
      f"max |anomaly difference| {diff:.2e}; mask pixels that differ: {flips} of {mask.numel()}")
PY
