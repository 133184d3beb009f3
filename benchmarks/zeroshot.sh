#!/usr/bin/env bash
# The README's seven-task zero-shot table: dense vs SlimGPT 20 % vs 50 % on the default model.
# CPU-sized: the first 100 documents of each task (--limit 100); drop --limit for the full sets.
# Usage: bash benchmarks/zeroshot.sh [LIMIT]
set -euo pipefail
LIMIT=${1:-100}
OUT=benchmarks/results/zeroshot
DATA=${SLIMGPT_DATA:-../shared/data}
mkdir -p "$OUT"
[ -d "$OUT/p20" ] || slimgpt prune smollm2-135m --ratio 0.2 --out "$OUT/p20" --data-dir "$DATA"
[ -d "$OUT/p50" ] || slimgpt prune smollm2-135m --ratio 0.5 --out "$OUT/p50" --data-dir "$DATA"
slimgpt eval "$OUT/p20" --ppl '' --tasks commonsense --limit "$LIMIT" --json "$OUT/p20.json"           # dense + 20 %
slimgpt eval "$OUT/p50" --ppl '' --tasks commonsense --limit "$LIMIT" --json "$OUT/p50.json" --no-baseline
