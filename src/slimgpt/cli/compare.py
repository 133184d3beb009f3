"""``slimgpt compare``: every registered method at matched parameter counts (see :mod:`slimgpt.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt.cli.common import add_search_args
from slimgpt.defaults import (
    CPU_NSAMPLES,
    CPU_SEQLEN,
    DEFAULT_MODEL,
    DEFAULT_PROTOCOL,
    GPU_NSAMPLES,
    GPU_SEQLEN,
    PROTOCOLS,
)
from slimgpt.errors import ConfigError
from slimgpt.serving import TARGETS


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"zoo name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--ratio", default="0.2,0.5", help="comma-separated shares of ALL parameters to remove")
    p.add_argument("--methods", default="all",
                   help="comma list of methods, 'all' for every registered one; NAME@SCHEDULE runs a layer-wise method "
                        "under another --schedule, e.g. all,slimgpt@uniform,slimgpt@search (the searched allocation)")
    p.add_argument("--out", required=True, help="folder for compare.json and compare.md")
    p.add_argument("--max-windows", type=int, help="perplexity on the first N windows only (quick runs)")
    p.add_argument("--ppl", default="auto",
                   help="perplexity data set: auto (WikiText-2 when available, else a named held-out text) | wikitext2 "
                        "| wiki | c4 | FILE")
    p.add_argument("--ppl-seqlen", default="128",
                   help="perplexity window length(s), e.g. 128,2048 (paper: 128; BlockPruner/SliceGPT: 2048); "
                        "--max-windows counts windows of the first, the others read the same tokens")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS,
                   help="perplexity windows: slimgpt (a BOS per window) | gptq (one BOS for the whole text, as the "
                        "papers' code does)")
    p.add_argument("--tasks", help="zero-shot tasks for lm-eval, e.g. commonsense or boolq,piqa (default: none)")
    p.add_argument("--task-limit", type=float, help="documents per task (smoke tests only)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--calib", default="c4", help="calibration source for every method")
    p.add_argument("--nsamples", type=int, help=f"calibration windows (default {GPU_NSAMPLES} GPU / {CPU_NSAMPLES} CPU)")
    p.add_argument("--seqlen", type=int, help=f"calibration window length (default {GPU_SEQLEN} GPU / {CPU_SEQLEN} CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--depth-share", type=float, default=0.5, help="slimgpt+blockpruner: share of removed params in blocks")
    add_search_args(p)
    from slimgpt.search.options import add_allocation_args  # --search-* of slimgpt@search rows

    add_allocation_args(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT/compare.json (same settings; with other evaluation settings, "
                        "e.g. another --ppl-seqlen or --tasks, models kept by --keep-models are evaluated again)")
    p.add_argument("--keep-models", metavar="DIR",
                   help="save every pruned model under DIR/<ratio>-<method>/ (loadable like any pruned folder)")
    p.add_argument("--target", default="any", choices=TARGETS,
                   help="serving engine every method's shapes must fit (as slimgpt prune --target): any | vllm | sglang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ and calibration/ (default $SLIMGPT_DATA)")


def run(a: argparse.Namespace) -> int:
    """Compare pruning methods at matched parameter counts (one Markdown + JSON table)."""
    if a.max_windows is not None and a.max_windows < 1:
        raise ConfigError(f"--max-windows must be at least 1; got {a.max_windows}")
    from slimgpt.preflight import check_writable

    check_writable(Path(a.out) / "compare.json", "--out")  # before any model is loaded
    if a.keep_models:
        check_writable(Path(a.keep_models) / "x", "--keep-models")
    from slimgpt.compare import format_table, run_compare
    from slimgpt.config import PruneConfig
    from slimgpt.search.options import allocation_kwargs

    check_windows(a)
    limit = a.task_limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads an int as a document count, a float below 1 as a fraction
    base = PruneConfig(model=a.model, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size,
                       seed=a.seed, device=a.device, dtype=a.dtype, data_dir=a.data_dir, depth_share=a.depth_share,
                       search_dtype=a.search_dtype, search_nsamples=a.search_nsamples, target=a.target,
                       **allocation_kwargs(a))
    result = run_compare(a.model, a.ratio, a.methods, a.out, base=base, ppl_dataset=a.ppl, ppl_seqlen=a.ppl_seqlen,
                         max_windows=a.max_windows, ppl_protocol=a.protocol, tasks=a.tasks, task_limit=limit,
                         eval_batch_size=a.eval_batch_size, resume=a.resume, keep_models=a.keep_models)
    from slimgpt import distributed

    if distributed.is_main():  # under torchrun rank 0 prints and writes
        print(format_table(result))
        print(f"written to {a.out}/compare.json and {a.out}/compare.md")
    return 0


def check_windows(a: argparse.Namespace) -> None:
    """Before the first method runs: the model opens, and its calibration and perplexity windows are
    no longer than it reads and fit the memory (as a layer-wise method needs; whole-model methods
    need the weights and logits on top)."""
    from slimgpt.preflight import (
        check_architecture,
        check_calibration_memory,
        check_model,
        check_positions,
        geometry,
    )
    from slimgpt.utils import resolve_device, resolve_dtype

    geo = geometry(check_model(a.model, check_architecture))
    device = resolve_device(a.device)
    gpu = device.type == "cuda"
    nsamples = a.nsamples or (GPU_NSAMPLES if gpu else CPU_NSAMPLES)
    seqlen = a.seqlen or (GPU_SEQLEN if gpu else CPU_SEQLEN)
    check_positions(a.model, geo, seqlen)
    try:
        ppl_seqlens = [int(s) for s in str(a.ppl_seqlen).split(",") if s]
    except ValueError:
        raise ConfigError(f"--ppl-seqlen must be comma-separated integers; got '{a.ppl_seqlen}'") from None
    for s in ppl_seqlens:
        check_positions(a.model, geo, s, "--ppl-seqlen")
    check_calibration_memory(a.model, geo, nsamples, seqlen, a.batch_size, resolve_dtype(a.dtype, device).itemsize,
                             device)
