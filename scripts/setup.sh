#!/usr/bin/env bash
# Create .venv (once) and install oodtune with its test and onnx extras (so the ONNX tests run, not skip).
# Idempotent; safe to re-run.
# CPU PyTorch: torch==2.13.0 is pinned because a CPU build of exactly that version is what this
# workplace's machines carry on local disk (a plain `pip install torch` would pull a multi-GB CUDA build).
# On a machine with a GPU, install the CUDA build of torch first (any torch>=2.4 works) and set
# OODTUNE_TORCH= (empty) to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
TORCH_SPEC=${OODTUNE_TORCH-torch==2.13.0}
if [ -n "$TORCH_SPEC" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,onnx]'
