#!/usr/bin/env bash
# GPU session 1: decode the data, probe eager vs compiled throughput, then pretrain WRN-40-2 on CIFAR-10
# (100 epochs) with the faster mode. Stops itself before the device's 600 s limit; resumes from a carried
# .devdata/pretrain/last.pt when one is present.
source scripts/gpu/common.sh
python - <<'PY'
from oodtune.data import load_dataset
for n, s in [("cifar10", "train"), ("cifar10", "test"), ("tin-aux", "train"), ("tin-near", "test"), ("dtd", "test"),
             ("mnist", "test"), ("fashion-mnist", "test"), ("omniglot", "test"), ("gaussian", "test")]:
    print(n, s, len(load_dataset(n, ".devdata", s)))
PY
echo "data ready at $(elapsed)s"
python benchmarks/train_throughput.py --data-root "$DATA" --stages pretrain --paths oodtune --steps 100 --warmup 20 \
  --compile none --json "$OUT/probe_eager.json" | tail -4
timeout 200 python benchmarks/train_throughput.py --data-root "$DATA" --stages pretrain --paths oodtune --steps 200 \
  --warmup 30 --compile reduce-overhead --json "$OUT/probe_ro.json" | tail -4 || echo "reduce-overhead probe failed"
MODE=$(python - <<PY
import json, os
def rate(p):
    try: return json.load(open(p))["results"][0]["images_per_s"]
    except Exception: return 0
print("reduce-overhead" if rate("$OUT/probe_ro.json") > 1.15 * rate("$OUT/probe_eager.json") else "none")
PY
)
echo "compile mode: $MODE at $(elapsed)s"
mkdir -p /tmp/runs/pretrain
[ -f "$DATA/pretrain/last.pt" ] && cp "$DATA/pretrain/last.pt" /tmp/runs/pretrain/
LEFT=$(( 570 - $(elapsed) ))
timeout --signal=INT "$LEFT" python -m oodtune.cli pretrain --dataset cifar10 --arch wrn-40-2 --epochs 100 --lr 0.1 \
  --batch-size 128 --seed 0 --compile "$MODE" --data-root "$DATA" --out /tmp/runs/pretrain 2>&1 | grep -v "^$" | tail -120 || true
ls -la /tmp/runs/pretrain
for f in model.pt last.pt; do [ -f /tmp/runs/pretrain/$f ] && ship /tmp/runs/pretrain/$f pretrain-$f; done
echo "done at $(elapsed)s"
