#!/usr/bin/env bash
# Issue 14's benchmark in one command: the searched allocation (slimgpt@search) against the paper's
# log schedule (slimgpt), the uniform schedule, SlimGPT+BlockPruner and the peers, at matched
# parameter counts, C4 64 × 512 calibration, WikiText-2 at seq 128 and 2048 over the same tokens
# (JSON + Markdown per model).
#   SmolLM2-135M at 20 % and 50 %: benchmarks/results/compare_all/   (~4 h on 2 cores: block searches, two 25-min searches)
#   Qwen2.5-Coder-0.5B at 20 %:    benchmarks/results/compare_qwen2.5-0.5b/   (~1.5 h; no SlimGPT+BlockPruner row:
#                                  its block search on all 64 calibration windows takes hours on 2 cores)
# Extra arguments (e.g. --resume, --device cuda) go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/compare.py --ratios 0.2,0.5 --methods all,slimgpt@log,slimgpt@uniform,slimgpt@search \
    --search-nsamples 4 --max-windows 256 --ppl-seqlen 128,2048 --out benchmarks/results/compare_all "$@"
python benchmarks/compare.py --model qwen2.5-0.5b --ratios 0.2 \
    --methods shortgpt,slimgpt@log,slimgpt@search,slimgpt@uniform,flap --max-windows 128 --ppl-seqlen 128,2048 \
    --search-budget 20m --out benchmarks/results/compare_qwen2.5-0.5b "$@"
