"""``slimgpt eval``: perplexity and zero-shot accuracy of a model beside its dense source model."""

from __future__ import annotations

import argparse

from slimgpt.cli.common import add_task_args, check_task_args, parse_limit
from slimgpt.defaults import DEFAULT_PROTOCOL, PROTOCOLS
from slimgpt.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder, zoo name, local folder or hub id")
    p.add_argument("--ppl", nargs="?", const="auto", default=None,
                   help="perplexity data set: auto (WikiText-2 when available, else a named held-out text) | wikitext2 "
                        "| wiki | c4 | FILE (default: auto when no --tasks are given; not evaluated with --tasks alone)")
    p.add_argument("--seqlen", default="128", help="comma-separated window lengths (paper: 128; also 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS,
                   help="slimgpt: BOS + seqlen-1 text tokens in every window; gptq: the published convention (GPTQ, "
                        "SlimGPT's and SliceGPT's code): text tokenised once with one BOS, cut into seqlen windows")
    add_task_args(p, "--tasks")
    p.add_argument("--batch-size", type=int, default=8, help="windows / lm-eval requests per forward")
    p.add_argument("--baseline", help="dense model to compare against (default: the pruned folder's source model)")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate the source model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default $SLIMGPT_DATA)")
    p.add_argument("--json", help="write the results here as JSON (lm-eval version, data sources and sha256)")


def run(a: argparse.Namespace) -> int:
    """Perplexity and zero-shot accuracy of a model, beside its dense source model."""
    try:
        seqlens = [int(s) for s in a.seqlen.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seqlen must be comma-separated integers; got '{a.seqlen}'") from None
    if not seqlens or min(seqlens) < 2:
        raise ConfigError(f"--seqlen must be window lengths of at least 2 tokens; got '{a.seqlen}'")
    if a.max_windows is not None and a.max_windows < 1:
        raise ConfigError(f"--max-windows must be at least 1; got {a.max_windows}")
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {a.batch_size}")
    if a.json:
        from slimgpt.preflight import check_writable

        check_writable(a.json, "--json file")
    if a.ppl is None and not a.tasks:
        a.ppl = "auto"  # evaluate only what is asked: perplexity when asked, or when nothing else is
    if not a.ppl and not a.tasks:
        raise ConfigError("nothing to evaluate: give --ppl DATA and/or --tasks TASKS")
    limit = parse_limit(a.limit)
    from slimgpt import distributed
    from slimgpt.evaluation.results import (
        eval_document,
        evaluate_model,
        ppl_table,
        run_config,
        source_model,
        write_json,
        zeroshot_table,
    )
    from slimgpt.utils import resolve_device, resolve_dtype

    device = distributed.init(resolve_device(a.device))  # torchrun: perplexity windows split across ranks
    if a.tasks and distributed.is_distributed():
        raise ConfigError("zero-shot tasks are not split across torchrun processes; run --tasks in one process")
    dtype = resolve_dtype(a.dtype, device)
    models = [("pruned" if source_model(a.model) else "model", a.model)]
    base = a.baseline or source_model(a.model)
    if base and not a.no_baseline:  # a --baseline may itself be pruned: only the recorded source is "dense"
        models.insert(0, ("baseline" if a.baseline else "dense", base))
    check_models(models, seqlens if a.ppl else [], a.batch_size, dtype.itemsize, device)
    if a.ppl:
        from slimgpt.evaluation.perplexity import resolve_eval_dataset

        a.ppl = resolve_eval_dataset(a.ppl, a.data_dir, run_config(a.model).get("calib"))
    check_task_args(a.tasks, a.num_fewshot, a.tasks_data)
    from slimgpt.zoo import load_model

    entries = []
    for label, name in models:
        model, tok = load_model(name, dtype=dtype, device=device)
        entries.append(evaluate_model(
            label, name, model, tok, ppl=a.ppl, seqlens=seqlens, max_windows=a.max_windows, tasks=a.tasks,
            num_fewshot=a.num_fewshot, limit=limit, batch_size=a.batch_size, data_dir=a.data_dir,
            tasks_data=a.tasks_data, protocol=a.protocol,
        ))
        del model
    if not distributed.is_main():
        return 0  # rank 0 prints and writes
    for table in (ppl_table(entries), zeroshot_table(entries)):
        if table:
            print(table + "\n")
    if a.json:
        settings = {"ppl": a.ppl, "seqlens": seqlens, "max_windows": a.max_windows, "tasks": a.tasks,
                    "num_fewshot": a.num_fewshot, "protocol": a.protocol, "limit": limit, "batch_size": a.batch_size,
                    "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        write_json(a.json, eval_document(entries, settings))
    return 0


def check_models(models: list[tuple[str, str]], seqlens: list[int], batch_size: int, itemsize: int,
                 device: object) -> None:
    """Before the first evaluation: every model opens (a truncated pruned folder fails now, not
    after minutes of scoring the baseline), reads windows of every length, and fits the memory."""
    from slimgpt.preflight import check_eval_memory, check_model, check_positions, geometry

    for _, name in models:
        geo = geometry(check_model(name))
        for s in seqlens:
            check_positions(name, geo, s)
            check_eval_memory(name, geo, s, batch_size, itemsize, device)
