#!/usr/bin/env bash
# Create .venv (once) and install oodtune with its test and onnx extras (so the ONNX tests run, not skip).
# Idempotent; safe to re-run.
#
# PyTorch: oodtune needs torch>=2.4, any build. Unless a torch is already installed in .venv, this script installs
# the CPU build of the version CI tests (torch==2.13.0+cpu, about 200 MB), because a plain `pip install torch` on
# Linux pulls the multi-GB CUDA build. PyTorch publishes its CPU builds on its own index, so pip must see it: run
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (or have the wheel in a folder named by PIP_FIND_LINKS). For a GPU, use a CUDA build instead: install it into
# .venv first (`.venv/bin/pip install torch`, or a build from https://pytorch.org/get-started/), and this script
# keeps it; or set OODTUNE_TORCH to the pip spec to install (empty: install no torch here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
TORCH_SPEC=${OODTUNE_TORCH-torch==2.13.0+cpu}
if [ -n "$TORCH_SPEC" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"; then
    echo "setup.sh: could not install $TORCH_SPEC (the CPU build of PyTorch). Fix: let pip see PyTorch's CPU index" \
         "(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh), or install the torch" \
         "you want into .venv first (e.g. a CUDA build), or set OODTUNE_TORCH to its pip spec." >&2
    exit 1
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,onnx]'
