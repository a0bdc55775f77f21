#!/usr/bin/env bash
# Install (scripts/setup.sh), then check style and types: ruff (lint + import order) and mypy, both configured
# in pyproject.toml. CI runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/mypy
