#!/usr/bin/env bash
# GPU session(s) for issue "Speed": (1) the same-process throughput table, oodtune with CUDA graphs
# (--compile reduce-overhead, model scope) vs the reference-style loop, plus the whole-step scope; (2) the
# reference loop's 100-epoch WRN-40-2 accuracy (benchmarks/reference_train.py), resumable across calls:
# the shipped reference-last.pt.part* rejoined as .devdata/reference/last.pt continues it on the next call,
# which skips (1).
#   BUDGET=575 bash scripts/gpu/session3_speed.sh
source scripts/gpu/common.sh
mkdir -p /tmp/runs/reference
if [ -f "$DATA/reference/last.pt" ]; then
  cp -n "$DATA/reference/last.pt" /tmp/runs/reference/
else
  python benchmarks/train_throughput.py --data-root "$DATA" --steps 200 --warmup 30 --compile reduce-overhead \
    --json "$OUT/speed_same_process.json" | tail -8
  python benchmarks/train_throughput.py --data-root "$DATA" --paths oodtune --steps 200 --warmup 30 \
    --compile reduce-overhead --compile-scope step --json "$OUT/speed_step_scope.json" | tail -6
fi
echo "reference run: $(left)s left"
timeout --signal=INT "$(left)" python benchmarks/reference_train.py --data-root "$DATA" --out /tmp/runs/reference \
  --json "$OUT/reference_train.json" 2>&1 | tail -40 || echo "reference run stopped at $(elapsed)s"
for f in last.pt model.pt; do [ -f /tmp/runs/reference/$f ] && ship /tmp/runs/reference/$f reference-$f; done
ls -la "$OUT"; echo "done at $(elapsed)s"
