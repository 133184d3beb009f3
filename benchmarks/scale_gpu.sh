#!/usr/bin/env bash
# Issue #23, one command on one GPU: the whole Llama-3.1-8B shape (32 layers, random weights), bf16,
# 256 x 2048 calibration (the paper's setting), pruned by `slimgpt prune` at --ratio 0.2 as a user
# would (checkpoints and the saved model included); prints the JSON (and writes it, with a Markdown
# table, to $WORK). Expected on an H100/H200: about 1 minute to write the random model, a few
# minutes for the prune; it needs ~50 GB of disk under $WORK (source 16 GB, layer checkpoints and
# the output ~13 GB each, one set of activations 4.3 GB) and ~40 GB of host memory.
#
#   bash benchmarks/scale_gpu.sh
#   WORK=/local/nvme/scale bash benchmarks/scale_gpu.sh
#   DEVICE=cpu PRESET=tiny NSAMPLES=8 SEQLEN=64 DTYPE=float32 bash benchmarks/scale_gpu.sh   # the script's own check
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-llama-3.1-8b}
NSAMPLES=${NSAMPLES:-256}
SEQLEN=${SEQLEN:-2048}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
WORK=${WORK:-${TMPDIR:-/tmp}/slimgpt-scale-gpu}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PYTHON=.venv/bin/python; fi
PYTHON=${PYTHON:-python}
mkdir -p "$WORK"
# the JSON goes to stdout last; the run's progress to stderr
"$PYTHON" benchmarks/scale.py --preset "$PRESET" ${LAYERS:+--layers "$LAYERS"} --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    --device "$DEVICE" --dtype "$DTYPE" --work "$WORK" --json "$WORK/scale.json" --md "$WORK/scale.md" \
    ${SLIMGPT_DATA:+--data-dir "$SLIMGPT_DATA"} "$@" >&2
cat "$WORK/scale.json"
