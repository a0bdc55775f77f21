#!/usr/bin/env bash
# Training speed on the GPU machine (results/speed.md), resumable across calls of at most BUDGET seconds:
#   BUDGET=575 bash scripts/gpu/speed.sh
# (1) the same-process throughput table: oodtune eager vs CUDA graphs (model scope) vs the reference-style loop,
#     and the whole-step compile scope (benchmarks/train_throughput.py);
# (2) the reference loop's 100-epoch WRN-40-2 accuracy (benchmarks/reference_train.py); a previous call's shipped
#     reference-last.pt.part*, rejoined as $DATA/reference/last.pt, continues it (and skips (1)).
source scripts/gpu/common.sh
RUN=$RUNS/reference
mkdir -p "$RUN"
if [ -f "$DATA/reference/last.pt" ]; then
  cp -n "$DATA/reference/last.pt" "$RUN/"
else
  python benchmarks/train_throughput.py --data-root "$DATA" --steps 200 --warmup 30 --compile reduce-overhead \
    --json "$OUT/speed_same_process.json" | tail -8
  python benchmarks/train_throughput.py --data-root "$DATA" --paths oodtune --steps 200 --warmup 30 \
    --compile reduce-overhead --compile-scope step --json "$OUT/speed_step_scope.json" | tail -6
fi
echo "reference run: $(left)s left"
timeout --signal=INT "$(( $(left) - 10 ))" python benchmarks/reference_train.py --data-root "$DATA" --out "$RUN" \
  --json "$OUT/reference_train.json" 2>&1 | tail -40 || echo "reference run stopped at $(elapsed)s"
for f in last.pt model.pt; do [ -f "$RUN/$f" ] && ship "$RUN/$f" "reference-$f"; done
ls -la "$OUT"; echo "done at $(elapsed)s"
