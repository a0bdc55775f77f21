#!/usr/bin/env bash
# GPU sessions 2+: the CIFAR-10 offline benchmark grid from the carried pretrained WRN-40-2. Resumable:
# finished runs travel back (as eval JSON, no weights) in bench.tgz.part*, which the next call unpacks.
source scripts/gpu/common.sh
RUN=/tmp/runs/cifar10-offline
mkdir -p "$RUN/pretrain"
cp "$DATA/pretrain/model.pt" "$RUN/pretrain/model.pt"
if ls "$DATA"/bench.tgz.part* >/dev/null 2>&1; then cat "$DATA"/bench.tgz.part* | tar xzf - -C /tmp; fi
LEFT=$(( ${BUDGET:-560} - $(elapsed) ))
timeout --signal=INT "$LEFT" python -m oodtune.cli benchmark configs/cifar10-offline.toml --data-root "$DATA" \
  --out "$RUN" 2>&1 | grep -v "^$" || echo "benchmark stopped (time limit or error) at $(elapsed)s"
tar czf - -C /tmp --exclude=model.pt runs | split -b 15M -d - "$OUT/bench.tgz.part"
ls -la "$OUT"; echo "done at $(elapsed)s"
