#!/usr/bin/env bash
# Recovery at 20M tokens on one GPU (issue 25): SmolLM2-135M pruned by SlimGPT at RATIO (default 0.5),
# KL full-parameter distillation from the dense model, then WikiText-2 (seq 128, 256 windows) and
# the 200-document zero-shot table; JSON + Markdown + PNG like the CPU run (benchmarks/distill.py).
#
#   bash benchmarks/distill_gpu.sh                  # RATIO=0.5; RATIO=0.2 for the other model
#   RESULTS=benchmarks/results/distill_gpu RATIO=0.2 bash benchmarks/distill_gpu.sh
#
# Sized for <= 8 minutes on one H100/H200 (bf16 autocast, fp32 weights and AdamW): one global
# batch of 128 x 256 tokens per step (610 steps). C4 holds ~300k tokens, so 20M tokens would read
# it ~67 times; the run mixes C4 with text sampled from the teacher (kl-mix: half of the windows),
# TEACHER_TOKENS of it (default 1M: token-by-token decoding at batch 256, ~2 minutes), sampled once
# and read ~10 times. BUDGET=10M halves the training time; PYTHON picks the interpreter.
# A GPU machine with no network and small transfers: tools/device_stage.sh stages the model, texts and wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
RATIO=${RATIO:-0.5}
BUDGET=${BUDGET:-20M}
RESULTS=${RESULTS:-benchmarks/results/distill_gpu}
WORK=${WORK:-/tmp/slimgpt-distill-gpu}
PY=${PYTHON:-python3}
PCT=$("$PY" -c "print(round(float('$RATIO') * 100))")
"$PY" benchmarks/distill.py --ratios "$RATIO" --budgets "$BUDGET" --methods "" --extra kl-mix \
    --batch-size 128 --grad-accum 1 --lr-full "${LR:-3e-4}" --teacher-tokens "${TEACHER_TOKENS:-1M}" \
    --nsamples 64 --calib-seqlen 512 --ppl-windows 256 --zeroshot-limit 200 \
    --device cuda --work "$WORK" --out "$RESULTS/distill_p$PCT" "$@"
