#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite on the CPU: the fast default set, the end-to-end runs
# (`-m e2e`: real pretrain / fine-tune / benchmark / CLI runs), then the slow probes (kill -9/resume, concurrency,
# disk full; `-m slow`). Arguments are passed to pytest instead (one run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then
  OODTUNE_PROGRESS=0 .venv/bin/python -m pytest "$@"
else
  OODTUNE_PROGRESS=0 .venv/bin/python -m pytest
  OODTUNE_PROGRESS=0 .venv/bin/python -m pytest -m e2e
  OODTUNE_PROGRESS=0 .venv/bin/python -m pytest -m slow
fi
