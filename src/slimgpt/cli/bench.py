"""``slimgpt bench``: generation speed and memory of several models side by side (paper Table 4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt import __version__
from slimgpt.defaults import TABLE4_NEW_TOKENS
from slimgpt.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="zoo names or folders; the first is the reference for speed-ups (put the dense one first)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=TABLE4_NEW_TOKENS,
                   help=f"generated tokens per run (paper Table 4: {TABLE4_NEW_TOKENS})")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is the fair choice on a busy machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", help="write the full results (per-repeat timings included) here")


def bench_labels(names: list[str]) -> list[str]:
    """Short distinct labels: a folder's name, or the zoo name; numbered on collision."""
    labels: list[str] = []
    for name in names:
        base = Path(name).name or name
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels.append(label)
    return labels


def run(a: argparse.Namespace) -> int:
    """Generation speed and memory of several models side by side (paper Table 4)."""
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {a.threads}")
    from slimgpt.preflight import check_model, check_writable

    if a.json:
        check_writable(a.json, "--json file")
    for name in a.models:  # every model opens before the first is loaded and timed
        check_model(name)
    from slimgpt.evaluation.bench import benchmark_generation, format_table
    from slimgpt.evaluation.results import write_json
    from slimgpt.utils import resolve_device, resolve_dtype
    from slimgpt.zoo import load_model
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    loaded = []
    for label, name in zip(bench_labels(a.models), a.models):
        model, tok = load_model(name, dtype=dtype, device=device)
        loaded.append((label, model, tok))
    result = benchmark_generation(loaded, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                                  repeats=a.repeats, warmup=a.warmup, num_threads=a.threads)
    result["model_paths"] = dict(zip(bench_labels(a.models), a.models))
    print(format_table(result))
    if a.json:
        write_json(a.json, {"kind": "slimgpt-bench", "slimgpt_version": __version__, **result})
    return 0
