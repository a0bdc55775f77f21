#!/usr/bin/env bash
# Run (or continue) a benchmark grid on the GPU machine, resumable across calls of at most BUDGET seconds:
#   BUDGET=560 bash scripts/gpu/benchmark.sh CONFIG [oodtune-benchmark options, e.g. --only SLUG]
# Runs go to $RUNS/NAME (NAME = the config's file stem) and stay there while the machine is kept; every call also
# ships them back (evaluation records, the pretrained checkpoint and unfinished last.pt files; no fine-tuned
# weights) as bench.tgz.part*, which a call on a fresh machine unpacks again from $DATA/bench/.
# PRETRAINED=FILE seeds the grid with an existing pretrained checkpoint, so new rows fine-tune the same model as
# earlier ones (values derived from it, like the outlier prior, are cached under its SHA-256).
source scripts/gpu/common.sh
CONFIG=${1:?usage: scripts/gpu/benchmark.sh CONFIG [benchmark options]}
shift
NAME=$(basename "$CONFIG" .toml)
RUN=$RUNS/$NAME
if [ ! -d "$RUN" ] && ls "$DATA"/bench/bench.tgz.part* >/dev/null 2>&1; then
  cat "$DATA"/bench/bench.tgz.part* | tar xzf - -C "$(dirname "$RUNS")"
fi
mkdir -p "$RUN/pretrain"
[ -n "${PRETRAINED:-}" ] && cp -n "$PRETRAINED" "$RUN/pretrain/model.pt"
echo "$NAME: $(left)s left"
timeout --signal=INT "$(( $(left) - 30 ))" python -m oodtune.cli benchmark "$CONFIG" --data-root "$DATA" \
  --out "$RUN" "$@" 2>&1 | grep -v "^$" || echo "benchmark $NAME stopped (time limit or error) at $(elapsed)s"
rm -f "$OUT"/bench.tgz.part*
tar czf - -C "$(dirname "$RUNS")" --exclude='*/runs/*/model.pt' "$(basename "$RUNS")" | split -b "${SPLIT_MB}M" -d - "$OUT/bench.tgz.part"
ls -la "$OUT"; echo "done at $(elapsed)s"
