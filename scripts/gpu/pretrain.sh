#!/usr/bin/env bash
# Pretrain a classifier on the GPU machine, resumable across calls of at most BUDGET seconds:
#   BUDGET=575 bash scripts/gpu/pretrain.sh [oodtune-pretrain options]
# Defaults: WRN-40-2 on CIFAR-10, 100 epochs (the PRETRAIN recipe). A previous call's shipped last.pt, rejoined
# as $DATA/pretrain/last.pt, continues the run. PROBE=1 first measures eager vs CUDA-graph throughput
# (benchmarks/train_throughput.py) and pretrains with the faster mode; otherwise --compile auto applies.
# Ships model.pt (when finished) and last.pt (otherwise) as pretrain-*.pt.part* (see scripts/gpu/common.sh).
source scripts/gpu/common.sh
python - "$DATA" <<'PY'
import sys
from oodtune.data import load_dataset
for n, s in [("cifar10", "train"), ("cifar10", "test"), ("tin-aux", "train"), ("tin-near", "test"), ("dtd", "test"),
             ("mnist", "test"), ("fashion-mnist", "test"), ("omniglot", "test"), ("gaussian", "test")]:
    print(n, s, len(load_dataset(n, sys.argv[1], s)))
PY
echo "data ready at $(elapsed)s"
MODE=auto
if [ "${PROBE:-0}" = 1 ]; then
  python benchmarks/train_throughput.py --data-root "$DATA" --stages pretrain --paths oodtune --steps 100 \
    --warmup 20 --compile none --json "$OUT/probe_eager.json" | tail -4
  timeout 200 python benchmarks/train_throughput.py --data-root "$DATA" --stages pretrain --paths oodtune \
    --steps 200 --warmup 30 --compile reduce-overhead --json "$OUT/probe_ro.json" | tail -4 \
    || echo "reduce-overhead probe failed"
  MODE=$(python - "$OUT" <<'PY'
import json, sys
def rate(p):
    try: return json.load(open(p))["results"][0]["images_per_s"]
    except (OSError, KeyError, IndexError, ValueError): return 0
out = sys.argv[1]
print("reduce-overhead" if rate(f"{out}/probe_ro.json") > 1.15 * rate(f"{out}/probe_eager.json") else "none")
PY
)
fi
echo "compile mode: $MODE at $(elapsed)s"
RUN=$RUNS/pretrain
mkdir -p "$RUN"
[ -f "$DATA/pretrain/last.pt" ] && cp -n "$DATA/pretrain/last.pt" "$RUN/"
timeout --signal=INT "$(( $(left) - 10 ))" python -m oodtune.cli pretrain --compile "$MODE" --data-root "$DATA" \
  --out "$RUN" "$@" 2>&1 | grep -v "^$" | tail -120 || true
for f in model.pt last.pt; do [ -f "$RUN/$f" ] && ship "$RUN/$f" "pretrain-$f"; done
ls -la "$OUT"; echo "done at $(elapsed)s"
