#!/usr/bin/env bash
# Install (scripts/setup.sh), then run a small real experiment on the default data and print its table:
# pretrain a WRN-16-2 on a CIFAR-10 subsample, fine-tune it with Energy-OE and Balanced Energy on Tiny
# ImageNet outliers, and compare with MSP/Energy on near- and far-OOD sets (configs/quickstart-cpu.toml).
# Data root: $OODTUNE_DATA, else ../shared/data (the offline mirrors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${OODTUNE_DATA:-../shared/data}
.venv/bin/oodtune benchmark configs/quickstart-cpu.toml --data-root "$DATA" "$@"
cat runs/quickstart-cpu/results.md
