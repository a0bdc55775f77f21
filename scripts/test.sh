#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OODTUNE_PROGRESS=0 .venv/bin/python -m pytest "$@"
