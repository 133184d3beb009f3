#!/usr/bin/env bash
# The README's zero-shot tables: dense vs SlimGPT 20 % vs 50 % on the default model, the seven
# commonsense tasks (0-shot) and MMLU (5-shot), through lm-evaluation-harness with its standard errors.
# CPU-sized: the first LIMIT documents of each task (MMLU: of each of its 57 subjects); pass "full"
# for the whole sets (about 69k requests, ~2.3 h per model on 2 cores at ~8.4 requests/s).
# Usage: bash benchmarks/zeroshot.sh [LIMIT] [MMLU_LIMIT]      (defaults 500 and 20)
# Writes p20.json / p50.json (+ mmlu_*.json) and the Markdown tables zeroshot.md (+ mmlu.md).
# Environment: BATCH (lm-eval requests per forward, default 8: fastest on 2 cores; 64 on a GPU),
# DTYPE (default float32 everywhere, so that a GPU run prunes and scores the same way as the CPU),
# RESULTS (output folder, default benchmarks/results/zeroshot), RESUME=1 (skip steps whose JSON exists).
set -euo pipefail
LIMIT=${1:-500}
MMLU_LIMIT=${2:-20}
BATCH=${BATCH:-8}
DTYPE=${DTYPE:-float32}
RES=${RESULTS:-benchmarks/results/zeroshot}
RESUME=${RESUME:-0}
DATA=${SLIMGPT_DATA:-../shared/data}
lim() { [ "$1" = full ] || echo "--limit $1"; }
# ev JSON MODEL ARGS...: one evaluation, skipped under RESUME=1 when its JSON is already there
ev() {
  local json=$1; shift
  [ "$RESUME" = 1 ] && [ -f "$json" ] && { echo "skip: $json exists"; return; }
  slimgpt eval "$@" --batch-size "$BATCH" --dtype "$DTYPE" --json "$json"
}
# needs P: a model folder is needed unless RESUME=1 and every JSON made from it is there already
needs() {
  [ "$RESUME" = 1 ] || return 0
  [ -f "$RES/$1.json" ] || return 0
  [ "$MMLU_LIMIT" = 0 ] || [ -f "$RES/mmlu_$1.json" ] || return 0
  return 1
}
mkdir -p "$RES"
for p in 20 50; do
  if needs "p$p" && [ ! -d "$RES/p$p" ]; then
    slimgpt prune smollm2-135m --ratio "0.$p" --schedule log --out "$RES/p$p" --data-dir "$DATA" --dtype "$DTYPE"
  fi
done
# shellcheck disable=SC2046
{
ev "$RES/p20.json" "$RES/p20" --tasks commonsense $(lim "$LIMIT")            # dense + 20 %
ev "$RES/p50.json" "$RES/p50" --tasks commonsense $(lim "$LIMIT") --no-baseline
python "$(dirname "$0")/zeroshot_table.py" "$RES/p20.json" "$RES/p50.json" --out "$RES/zeroshot.md"
[ "$MMLU_LIMIT" = 0 ] && exit 0
ev "$RES/mmlu_p20.json" "$RES/p20" --tasks mmlu --num-fewshot 5 $(lim "$MMLU_LIMIT")
ev "$RES/mmlu_p50.json" "$RES/p50" --tasks mmlu --num-fewshot 5 $(lim "$MMLU_LIMIT") --no-baseline
python "$(dirname "$0")/zeroshot_table.py" "$RES/mmlu_p20.json" "$RES/mmlu_p50.json" --out "$RES/mmlu.md"
}
