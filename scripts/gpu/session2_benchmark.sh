#!/usr/bin/env bash
# GPU sessions 2+: a benchmark grid on the lent H100, resumable across device calls.
#   BUDGET=560 bash scripts/gpu/session2_benchmark.sh [CONFIG [oodtune-benchmark options, e.g. --only SLUG]]
# CONFIG defaults to configs/cifar10-offline.toml, whose pretrained WRN-40-2 (session 1) is reused from
# .devdata/pretrain/model.pt; other configs pretrain their own model. Runs go to /tmp/runs/NAME and stay there while the machine is warm; every call also ships
# them back (evaluation JSON, pretrained and last.pt checkpoints; no fine-tuned weights) as bench.tgz.part*,
# which a call on a fresh machine unpacks from .devdata/bench/. Several invocations in one call share BUDGET.
source scripts/gpu/common.sh
CONFIG=${1:-configs/cifar10-offline.toml}
shift || true
NAME=$(basename "$CONFIG" .toml)
RUN=/tmp/runs/$NAME
if [ ! -d /tmp/runs ] && ls "$DATA"/bench/bench.tgz.part* >/dev/null 2>&1; then
  cat "$DATA"/bench/bench.tgz.part* | tar xzf - -C /tmp
fi
mkdir -p "$RUN/pretrain"
if [ "$NAME" = cifar10-offline ]; then
  cp -n "$DATA/pretrain/model.pt" "$RUN/pretrain/model.pt"
fi
echo "$NAME: $(left)s left"
timeout --signal=INT "$(left)" python -m oodtune.cli benchmark "$CONFIG" --data-root "$DATA" --out "$RUN" "$@" 2>&1 \
  | grep -v "^$" || echo "benchmark $NAME stopped (time limit or error) at $(elapsed)s"
rm -f "$OUT"/bench.tgz.part*
tar czf - -C /tmp --exclude=cifar10-offline/pretrain/model.pt --exclude='runs/*/runs/*/model.pt' runs \
  | split -b 15M -d - "$OUT/bench.tgz.part"
ls -la "$OUT"; echo "done at $(elapsed)s"
