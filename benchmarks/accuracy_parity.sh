#!/usr/bin/env bash
# Accuracy parity at CPU scale: oodtune's Trainer vs the reference-style loop (benchmarks/reference_train.py),
# same recipe and, per seed, the same initial weights; WRN-16-1, 10 epochs, a seeded 20,000-image CIFAR-10
# subsample, test accuracy on the full test split. Prints a table and writes OUT/parity.json.
#   bash benchmarks/accuracy_parity.sh DATA_ROOT OUT [SEEDS...]      (default seeds 0 1 2; ~10 min per seed)
set -eu
DATA=$1 OUT=$2
shift 2
SEEDS=${*:-0 1 2}
export OODTUNE_PROGRESS=0
mkdir -p "$OUT"
for s in $SEEDS; do
  oodtune pretrain --dataset cifar10 --arch wrn-16-1 --epochs 10 --num-train 20000 --seed "$s" --device cpu \
    --data-root "$DATA" --out "$OUT/oodtune-s$s" > "$OUT/oodtune-s$s.log" 2>&1
  oodtune evaluate "$OUT/oodtune-s$s/model.pt" --score msp --ood gaussian --device cpu \
    --data-root "$DATA" --out "$OUT/oodtune-s$s.json" >> "$OUT/oodtune-s$s.log" 2>&1
  python benchmarks/reference_train.py --data-root "$DATA" --arch wrn-16-1 --epochs 10 \
    --num-train 20000 --seed "$s" --device cpu --out "$OUT/reference-s$s" \
    --json "$OUT/reference-s$s.json" > "$OUT/reference-s$s.log" 2>&1
done
python - "$OUT" $SEEDS <<'PY'
import json, statistics, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2:]
rows = {s: {"oodtune": json.loads((out / f"oodtune-s{s}.json").read_text())["accuracy"],
            "reference": 100 * json.loads((out / f"reference-s{s}.json").read_text())["test_accuracy"]} for s in seeds}
print("| seed | oodtune Trainer | reference-style loop | difference |\n| --- | ---: | ---: | ---: |")
for s, r in rows.items():
    print(f"| {s} | {r['oodtune']:.2f} | {r['reference']:.2f} | {r['oodtune'] - r['reference']:+.2f} |")
col = {k: [r[k] for r in rows.values()] for k in ("oodtune", "reference")}
diff = [a - b for a, b in zip(col["oodtune"], col["reference"])]
sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
print(f"| mean ± std | {statistics.mean(col['oodtune']):.2f} ± {sd(col['oodtune']):.2f} | "
      f"{statistics.mean(col['reference']):.2f} ± {sd(col['reference']):.2f} | {statistics.mean(diff):+.2f} ± {sd(diff):.2f} |")
(out / "parity.json").write_text(json.dumps({"test_accuracy_percent": rows}, indent=2) + "\n")
PY
