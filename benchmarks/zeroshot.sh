#!/usr/bin/env bash
# The README's zero-shot tables: dense vs SlimGPT 20 % vs 50 % on the default model, the seven
# commonsense tasks (0-shot) and MMLU (5-shot), through lm-evaluation-harness with its standard errors.
# CPU-sized: the first LIMIT documents of each task (MMLU: of each of its 57 subjects); pass "full"
# for the whole sets (about 69k requests, ~2.3 h per model on 2 cores at ~8.4 requests/s).
# Usage: bash benchmarks/zeroshot.sh [LIMIT] [MMLU_LIMIT]      (defaults 500 and 20)
set -euo pipefail
LIMIT=${1:-500}
MMLU_LIMIT=${2:-20}
OUT=benchmarks/results/zeroshot
DATA=${SLIMGPT_DATA:-../shared/data}
lim() { [ "$1" = full ] || echo "--limit $1"; }
mkdir -p "$OUT"
[ -d "$OUT/p20" ] || slimgpt prune smollm2-135m --ratio 0.2 --out "$OUT/p20" --data-dir "$DATA"
[ -d "$OUT/p50" ] || slimgpt prune smollm2-135m --ratio 0.5 --out "$OUT/p50" --data-dir "$DATA"
# shellcheck disable=SC2046
{
slimgpt eval "$OUT/p20" --tasks commonsense $(lim "$LIMIT") --json "$OUT/p20.json"            # dense + 20 %
slimgpt eval "$OUT/p50" --tasks commonsense $(lim "$LIMIT") --json "$OUT/p50.json" --no-baseline
[ "$MMLU_LIMIT" = 0 ] && exit 0
slimgpt eval "$OUT/p20" --tasks mmlu --num-fewshot 5 $(lim "$MMLU_LIMIT") --json "$OUT/mmlu_p20.json"
slimgpt eval "$OUT/p50" --tasks mmlu --num-fewshot 5 $(lim "$MMLU_LIMIT") --json "$OUT/mmlu_p50.json" --no-baseline
}
