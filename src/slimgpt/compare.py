"""``slimgpt compare``: every registered method at the same parameter count, one table.

Fair comparison means equal *parameter counts*, not equal nominal ratios: depth methods can only
remove whole layers or blocks. So, per target ratio, the depth methods run first, coarsest first
(whole layers, then blocks); the first one's *achieved* ratio becomes the matched target of every
method after it (blocks round to the nearest block, width methods land within a channel). Each row
records the exact parameter count and its distance from the matched target, pruning time, peak
memory and WikiText-2 perplexity (optionally zero-shot accuracies).

The method list is read from :data:`slimgpt.methods.METHODS` at run time, so methods registered by
other modules take part without changes here. ``NAME@SCHEDULE`` runs a layer-wise method under another
width schedule (``slimgpt@uniform``, ``slimgpt@search`` for the searched allocation), one row each.
Perplexity can be taken at several window lengths (``ppl_seqlen="128,2048"``: the paper's 128 and
BlockPruner's and SliceGPT's 2048) and under either window protocol (``slimgpt`` or ``gptq``). A method that fails is recorded with its error and
the run goes on; the JSON and Markdown are rewritten after every row, so a long run that is
interrupted keeps what it finished.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
import traceback
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from slimgpt import __version__, distributed
from slimgpt.config import CPU_NSAMPLES, CPU_SEQLEN, GPU_NSAMPLES, GPU_SEQLEN, PruneConfig
from slimgpt.errors import ConfigError, SlimGPTError
from slimgpt.evaluation.perplexity import DEFAULT_PROTOCOL
from slimgpt.methods import make_method
from slimgpt.utils import rss_bytes

log = logging.getLogger(__name__)

_DEPTH_ORDER = {"layer": 0, "block": 1}


def parse_ratios(text: str | list[float]) -> list[float]:
    """``"0.2,0.5"`` → ``[0.2, 0.5]``, each in (0, 1)."""
    if isinstance(text, str):
        try:
            ratios = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--ratio must be comma-separated numbers, e.g. 0.2,0.5; got '{text}'") from None
    else:
        ratios = [float(x) for x in text]
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"every --ratio must be in (0, 1); got {text}")
    return ratios


def split_variant(name: str) -> tuple[str, str | None]:
    """``"slimgpt@search"`` → ``("slimgpt", "search")``; a plain name has no schedule override."""
    method, _, schedule = name.partition("@")
    return method, (schedule or None)


def resolve_methods(spec: str | list[str]) -> list[str]:
    """A comma list of registered names, each optionally ``NAME@SCHEDULE`` (a width schedule of
    ``slimgpt prune --schedule``, e.g. ``slimgpt@search``); ``all`` in the list stands for every
    registered method, so ``all,slimgpt@search`` is the whole table plus the searched allocation."""
    from slimgpt.methods import METHODS
    from slimgpt.schedule import SCHEDULES

    given = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [m for n in given if n.strip() for m in (list(METHODS) if n.strip() == "all" else [n.strip()])]
    unknown = [n for n in names if split_variant(n)[0] not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown method(s) {unknown or spec}; choose from {', '.join(METHODS)} or 'all'")
    for n in names:
        schedule = split_variant(n)[1]
        if schedule is not None and schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule in '{n}'; after '@' use one of {', '.join(SCHEDULES)}")
    return list(dict.fromkeys(names))


def method_config(base: PruneConfig, name: str, ratio: float) -> PruneConfig:
    """The shared settings with this row's method, schedule override and matched ratio."""
    method, schedule = split_variant(name)
    return PruneConfig(**{**base.to_dict(), "method": method, "ratio": ratio,
                          **({"schedule": schedule} if schedule else {})})


def depth_unit(name: str, cfg: PruneConfig) -> str | None:
    """``"layer"``/``"block"`` for methods that remove whole blocks (their ``depth_unit``), else None."""
    from slimgpt.methods import METHODS

    try:
        return getattr(METHODS[split_variant(name)[0]](method_config(cfg, name, cfg.ratio)), "depth_unit", None)
    except Exception:  # a factory that cannot build with the shared settings fails later, in its row
        return None


def parse_seqlens(text: int | str | list[int]) -> list[int]:
    """``128`` / ``"128,2048"`` → ``[128, 2048]`` (the first is the table's main column)."""
    if isinstance(text, int):
        values = [text]
    else:
        try:
            values = [int(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
        except ValueError:
            raise ConfigError(f"--ppl-seqlen must be comma-separated integers, e.g. 128,2048; got '{text}'") from None
    if not values or any(v < 2 for v in values):
        raise ConfigError(f"--ppl-seqlen must be integers of at least 2; got '{text}'")
    return list(dict.fromkeys(values))


def order_methods(names: list[str], cfg: PruneConfig) -> list[tuple[str, str | None]]:
    """Depth methods first, coarsest first; the rest in registry order."""
    units = [(n, depth_unit(n, cfg)) for n in names]
    return sorted(units, key=lambda nu: _DEPTH_ORDER.get(nu[1], 2) if nu[1] else 2)


def _eval_ppl(model: Any, tok: Any, dataset: str, seqlens: list[int], max_windows: int | None, data_dir: str | None,
              batch_size: int, device: torch.device, protocol: str) -> dict[str, Any]:
    """``{"ppl": <first seqlen>, "by_seqlen": {"2048": ...}}``: at every window length the same number
    of *tokens* as the first one reads (``max_windows`` counts windows of the first length), so the
    long windows cost no more than the short ones."""
    from slimgpt.evaluation.perplexity import perplexity

    by_seqlen: dict[str, dict[str, Any]] = {}
    for i, seqlen in enumerate(seqlens):
        windows = max_windows if max_windows is None or i == 0 else max(1, max_windows * seqlens[0] // seqlen)
        bs = batch_size if i == 0 else max(1, batch_size * seqlens[0] // seqlen)
        t = time.perf_counter()
        r = perplexity(model, tok, dataset, seqlen=seqlen, batch_size=bs, max_windows=windows,
                       data_dir=data_dir, device=device, progress=False, protocol=protocol)
        by_seqlen[str(seqlen)] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"], "seqlen": seqlen,
                                  "eval_s": time.perf_counter() - t}
    return {**by_seqlen[str(seqlens[0])], "by_seqlen": by_seqlen}


def _eval_tasks(model: Any, tok: Any, tasks: str | None, limit: float | None, batch_size: int) -> dict[str, Any] | None:
    if not tasks:
        return None
    try:
        from slimgpt.evaluation.zeroshot import evaluate_tasks
    except ImportError:
        log.warning("zero-shot evaluation is not available (slimgpt.evaluation.zeroshot.evaluate_tasks); skipped")
        return None
    res = evaluate_tasks(model, tok, tasks, limit=limit, batch_size=batch_size)
    keep = ("score", "metric", "acc", "acc_norm", "n")
    return {"tasks": {k: {m: v.get(m) for m in keep} for k, v in res["tasks"].items()},
            "average": res.get("average"), "average_metric": res.get("average_metric"), "limit": limit,
            "eval_s": res.get("wall_time_s")}


def run_compare(
    model: str,
    ratios: str | list[float],
    methods: str | list[str] = "all",
    out_dir: str | Path | None = None,
    *,
    base: PruneConfig | None = None,
    ppl_dataset: str = "wikitext2",
    ppl_seqlen: int | str | list[int] = 128,
    max_windows: int | None = None,
    ppl_protocol: str = DEFAULT_PROTOCOL,
    tasks: str | None = None,
    task_limit: float | None = None,
    eval_batch_size: int = 8,
    loaded: tuple[Any, Any] | None = None,
    progress: bool = True,
    resume: bool = False,
    keep_models: str | Path | None = None,
) -> dict[str, Any]:
    """Prune ``model`` with every method at every ratio (matched parameter counts), evaluate,
    write ``compare.json`` and ``compare.md`` to ``out_dir``; returns the JSON dict.

    ``base`` carries the shared pruning settings (calibration, device, dtype, ...); each method
    gets a copy with its own ``method`` and matched ``ratio``. ``loaded`` is an in-memory
    ``(model, tokenizer)`` to use instead of loading ``model`` (tests). With ``resume``, rows
    already in ``out_dir/compare.json`` (same model and settings, no error) are kept, not rerun.
    ``ppl_seqlen`` may list several window lengths; ``max_windows`` counts windows of the first.
    ``keep_models`` saves every pruned model under ``keep_models/<ratio>-<method>`` (recorded in its
    row as ``model_dir``); a later ``resume`` whose *evaluation* settings differ (another window
    length, protocol, task set) then re-evaluates those models instead of pruning again.
    """
    from slimgpt.api import prune
    from slimgpt.evaluation.perplexity import PROTOCOLS
    from slimgpt.surgery import parameter_count
    from slimgpt.utils import resolve_device, resolve_dtype
    from slimgpt.zoo import load_model

    ratio_list = parse_ratios(ratios)
    seqlens = parse_seqlens(ppl_seqlen)
    if ppl_protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got '{ppl_protocol}'")
    names = resolve_methods(methods)
    base = base or PruneConfig(model=model)
    base = PruneConfig(**{f.name: getattr(base, f.name) for f in fields(PruneConfig)})
    base.model, base.out, base.blocks = model, None, None
    base.validate()
    for name in names:  # e.g. a method --target refuses: one line before any model is loaded
        method_config(base, name, base.ratio).validate()
    from slimgpt.evaluation.perplexity import resolve_eval_dataset

    ppl_dataset = resolve_eval_dataset(ppl_dataset, base.data_dir, base.calib)  # the set in use, in the JSON
    device = distributed.init(resolve_device(base.device))  # under torchrun: windows split, rank 0 writes
    dtype = resolve_dtype(base.dtype, device)
    if tasks and distributed.is_distributed():
        raise ConfigError("zero-shot tasks are not split across torchrun processes; compare with --tasks in one process")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)

    if loaded is None:
        dense_model, tok = load_model(model, dtype=dtype, device="cpu")
    else:
        dense_model, tok = loaded
        dense_model.to(dtype)
    dense_model.eval()
    dense_params = parameter_count(dense_model)
    ordered = order_methods(names, base)

    result: dict[str, Any] = {
        "slimgpt_version": __version__, "model": model, "dense_params": dense_params,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "settings": {**{k: v for k, v in base.to_dict().items() if k not in ("model", "out", "method", "ratio", "blocks")},
                     "ppl_dataset": ppl_dataset, "ppl_seqlen": seqlens[0], "ppl_seqlens": seqlens,
                     "ppl_protocol": ppl_protocol, "max_windows": max_windows,
                     "tasks": tasks, "task_limit": task_limit},
        "matching": "depth methods first (whole layers, then blocks); later methods target the first one's achieved ratio",
        "methods": [n for n, _ in ordered],
        "rows": [],
    }

    done, reevaluate = _finished_rows(out, result, resume)
    keep = Path(keep_models) if keep_models is not None else None

    def write() -> None:
        if out is not None and distributed.is_main():
            (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            (out / "compare.md").write_text(format_table(result) + "\n")

    dense_row = done.get((0.0, "dense"))
    if dense_row is None:
        dense_model.to(device)
        dense_row = {"ratio": 0.0, "method": "dense", "params": dense_params, "removed_ratio": 0.0}
        dense_row["ppl"] = _eval_ppl(dense_model, tok, ppl_dataset, seqlens, max_windows, base.data_dir,
                                     eval_batch_size, device, ppl_protocol)
        dense_row["zeroshot"] = _eval_tasks(dense_model, tok, tasks, task_limit, eval_batch_size)
        dense_model.to("cpu")
    result["rows"].append(dense_row)
    write()

    for ratio in ratio_list:
        matched: float | None = None
        matched_by: str | None = None
        for name, unit in ordered:
            target = matched if matched is not None else ratio
            cfg = method_config(base, name, target)
            row: dict[str, Any] = {"ratio": ratio, "method": name, "depth_unit": unit, "target_ratio": target,
                                   "matched_to": matched_by}
            if (ratio, name) in done or (ratio, name) in reevaluate:
                row = done.get((ratio, name)) or reevaluate[(ratio, name)]
                if (ratio, name) in reevaluate:  # pruned before; only the evaluation changed
                    log.info("compare: %s at ratio %.2f: evaluating its kept model %s", name, ratio, row["model_dir"])
                    model, _ = load_model(row["model_dir"], dtype=dtype, device=device)
                    row.pop("error", None)
                    _evaluate_row(row, model, tok, ppl_dataset, seqlens, max_windows, base.data_dir, eval_batch_size,
                                  device, ppl_protocol, tasks, task_limit)
                    del model
                else:
                    log.info("compare: %s at ratio %.2f already in %s; kept", name, ratio, out)
                if unit and matched is None:
                    matched, matched_by = row["removed_ratio"], name
                result["rows"].append(row)
                write()
                continue
            log.info("compare: %s at ratio %.4f (nominal %.2f)", name, target, ratio)
            rss0 = rss_bytes()
            try:
                # a method that cannot split its work runs whole on every rank (same result everywhere)
                alone = distributed.solo() if not getattr(make_method(cfg), "distributed", False) else nullcontext()
                with alone:
                    res = prune(cfg, model=copy.deepcopy(dense_model), tokenizer=tok, progress=progress)
            except Exception as e:  # one broken method must not lose the others' results
                if not isinstance(e, SlimGPTError):
                    log.error("compare: %s failed:\n%s", name, traceback.format_exc())
                row["error"] = f"{type(e).__name__}: {e}"
                result["rows"].append(row)
                write()
                continue
            rep = res.report
            pruned = rep["params"]["pruned"]
            row.update({
                "params": pruned, "removed_params": dense_params - pruned,
                "removed_ratio": rep["params"]["removed_ratio"],
                "prune_s": rep["time_s"]["prune_total"],
                "peak_rss_mib": rep["memory"].get("peak_rss_mib"),
                "peak_rss_over_start_mib": rep["memory"].get("peak_rss_mib", 0) - rss0 / 2**20,
                "peak_cuda_mib": rep["memory"].get("peak_cuda_mib"),
            })
            if unit and matched is None:
                matched, matched_by = row["removed_ratio"], name
            row["off_target_params"] = pruned - round((1 - (matched if matched is not None else ratio)) * dense_params)
            auto = rep["method"].get("auto")
            if isinstance(auto, dict):  # --schedule auto: its choice, every candidate's score, the windows
                row["auto"] = auto_record(auto)
            search = rep["method"].get("search")
            if isinstance(search, dict) and rep["method"].get("schedule") == "search":  # the searched allocation
                row["allocation_search"] = {k: search.get(k) for k in ("generations", "stopped_by", "kl", "starts",
                                                                       "evaluations", "time_s", "allocation")}
            elif isinstance(search, dict):
                row["search"] = {k: search[k] for k in ("removed", "removed_layers", "evaluations", "search_s",
                                                        "calibration_tokens") if k in search}
                row["search"].update({k: v for k, v in (search.get("extra") or {}).items() if k.startswith("search_")})
            if keep is not None and distributed.is_main():
                from slimgpt.io import save_pruned

                row["model_dir"] = str(save_pruned(res.model, tok, keep / f"{ratio:g}-{name}", metadata=rep,
                                                   overwrite=True))
            model = res.model.to(device)
            _evaluate_row(row, model, tok, ppl_dataset, seqlens, max_windows, base.data_dir, eval_batch_size,
                          device, ppl_protocol, tasks, task_limit)
            del res, model
            gc.collect()
            result["rows"].append(row)
            write()
    write()  # rows kept by --resume after the last new one
    return result


def auto_record(auto: dict[str, Any]) -> dict[str, Any]:
    """What a row keeps of ``--schedule auto``'s report entry: the choice, every candidate's KL (mean
    and per scoring window), the windows it was solved and scored on, and its time."""
    keep = ("chosen", "kl", "kl_by_window", "windows", "hessian_windows", "score_windows", "from_checkpoint")
    return {**{k: auto[k] for k in keep if k in auto}, "time_s": (auto.get("time_s") or {}).get("total")}


def format_auto(method: str, ratio: float, a: dict[str, Any]) -> str:
    """One line of the table's notes: what ``--schedule auto`` chose, from which scores, on which windows."""
    kl = a.get("kl") or {}
    ranked = ", ".join(f"{'**' + n + '**' if n == a.get('chosen') else n} {v:.4f}"
                       for n, v in sorted(kl.items(), key=lambda kv: kv[1]))
    w = a.get("windows") or {}
    score = w.get("score") or []
    where = ""
    if score:
        h = w.get("hessian") or [0, a.get("hessian_windows")]
        held = "held out" if w.get("disjoint") else "in-sample"
        where = (f" on calibration windows {_ranges(score)} ({held}; Hessians on {h[0]}-{h[1] - 1}, "
                 f"seed {w.get('calibration_seed', '?')})")
    t = a.get("time_s")
    return (f"{method} at {ratio:.2f}: chose `{a.get('chosen')}`; KL {ranked}{where}"
            + (f"; {t:.1f} s" if isinstance(t, int | float) else "") + ".")


def _ranges(idx: list[int]) -> str:
    """``[16, 17, 18, 19, 30]`` → ``16-19, 30``."""
    out: list[str] = []
    for i in sorted(idx):
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def _evaluate_row(row: dict[str, Any], model: Any, tok: Any, ppl_dataset: str, seqlens: list[int],
                  max_windows: int | None, data_dir: str | None, batch_size: int, device: torch.device,
                  protocol: str, tasks: str | None, task_limit: float | None) -> None:
    """Fill ``row``'s perplexity and zero-shot cells; an evaluation error is the row's error."""
    try:
        row["ppl"] = _eval_ppl(model, tok, ppl_dataset, seqlens, max_windows, data_dir, batch_size, device, protocol)
        row["zeroshot"] = _eval_tasks(model, tok, tasks, task_limit, batch_size)
    except SlimGPTError as e:
        row["error"] = f"evaluation: {e}"


# Settings that change only how rows are scored: a resume that changes them re-evaluates kept models.
EVAL_SETTINGS = ("ppl_dataset", "ppl_seqlen", "ppl_seqlens", "ppl_protocol", "max_windows", "tasks", "task_limit")


def _finished_rows(out: Path | None, result: dict[str, Any], resume: bool
                   ) -> tuple[dict[tuple[float, str], dict], dict[tuple[float, str], dict]]:
    """Rows of an earlier run in ``out``, by ``(ratio, method)``: those to keep as they are, and
    (when only the evaluation settings changed) those whose kept model is to be evaluated again;
    rows without a kept model are then pruned again. An earlier run made with other pruning
    settings is refused rather than mixed in."""
    path = out / "compare.json" if out is not None else None
    if not resume or path is None or not path.is_file():
        return {}, {}
    prev = json.loads(path.read_text())
    now = json.loads(json.dumps(result, default=str))
    old = prev.get("settings") or {}  # files from before a setting existed held its default
    old.setdefault("ppl_seqlens", [old.get("ppl_seqlen")])
    old.setdefault("ppl_protocol", DEFAULT_PROTOCOL)
    for k, v in PruneConfig().to_dict().items():
        if k in now["settings"]:
            old.setdefault(k, v)
    prev["settings"] = old
    for key in ("model", "dense_params", "device", "dtype"):
        if prev.get(key) != now.get(key):
            raise ConfigError(f"--resume: {path} was made with another {key}; drop --resume or choose another --out")

    def split(settings: dict[str, Any], evaluation: bool) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if (k in EVAL_SETTINGS) == evaluation}

    if split(old, False) != split(now["settings"], False):
        raise ConfigError(f"--resume: {path} was made with another settings; drop --resume or choose another --out")
    rows = {(r["ratio"], r["method"]): r for r in prev.get("rows", []) if "error" not in r or r.get("model_dir")}
    if split(old, True) == split(now["settings"], True):
        return {k: r for k, r in rows.items() if "error" not in r}, {}
    kept = {k: r for k, r in rows.items() if r.get("model_dir") and Path(r["model_dir"]).is_dir()}
    log.info("compare: evaluation settings changed; %d kept models are evaluated again, %d rows pruned again",
             len(kept), len([k for k in rows if k not in kept and k[1] != "dense"]))
    return {}, kept


def _ppl_at(row: dict[str, Any], seqlen: int, i: int) -> float | None:
    ppl = row.get("ppl") or {}
    cell = (ppl.get("by_seqlen") or {}).get(str(seqlen))
    if cell is None and i == 0:  # rows from before several lengths were offered
        return ppl.get("ppl")
    return None if cell is None else cell["ppl"]


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """The comparison as Markdown: one row per (ratio, method)."""
    s = result["settings"]
    rows = [r for r in result["rows"]]
    task_names: list[str] = []
    for r in rows:
        for t in ((r.get("zeroshot") or {}).get("tasks") or {}):
            if t not in task_names:
                task_names.append(t)
    from slimgpt.evaluation.perplexity import dataset_label

    seqlens = s.get("ppl_seqlens") or [s["ppl_seqlen"]]
    protocol = s.get("ppl_protocol", DEFAULT_PROTOCOL)
    ppl_labels = [f"{dataset_label(s['ppl_dataset'])} PPL (seq {seqlens[0]})", *(f"seq {n}" for n in seqlens[1:])]
    head = ["ratio", "method", "params", "removed", "Δ params vs matched", *ppl_labels,
            *task_names, *(["zero-shot avg"] if task_names else []), "prune s", "peak RSS MiB"]
    cuda = any(r.get("peak_cuda_mib") for r in rows)
    if cuda:
        head.append("peak CUDA MiB")
    gpu = str(result["device"]).startswith("cuda")
    nsamples = s["nsamples"] or (GPU_NSAMPLES if gpu else CPU_NSAMPLES)
    seqlen = s["seqlen"] or (GPU_SEQLEN if gpu else CPU_SEQLEN)
    scope = f"the first {s['max_windows']} windows" if s["max_windows"] else "all windows"
    if s["max_windows"] and len(seqlens) > 1:
        scope += f" of {seqlens[0]} tokens (the same tokens at every length)"
    lines = [
        f"Model {result['model']} ({result['dense_params']:,} parameters), {result['device']} {result['dtype']}; "
        f"calibration {s['calib']} {nsamples}×{seqlen}; "
        f"perplexity ({protocol} protocol) on {scope}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if "error" in r and "params" not in r:
            lines.append(f"| {r['ratio']:.2f} | {r['method']} | error: {r['error'][:120]} |" + " |" * (len(head) - 3))
            continue
        zs = r.get("zeroshot") or {}
        accs = []
        for t in task_names:
            score = ((zs.get("tasks") or {}).get(t) or {}).get("score")
            accs.append(_fmt(None if score is None else 100 * score, ".2f"))
        if task_names:
            avg = zs.get("average")
            accs.append(_fmt(None if avg is None else 100 * avg, ".2f"))
        cells = [
            "dense" if r["method"] == "dense" else f"{r['ratio']:.2f}", r["method"], f"{r['params']:,}",
            f"{r['removed_ratio']:.2%}", _fmt(r.get("off_target_params"), "+,d"),
            *(_fmt(_ppl_at(r, n, i), ".2f") for i, n in enumerate(seqlens)), *accs,
            _fmt(r.get("prune_s"), ".1f"), _fmt(r.get("peak_rss_mib"), ".0f"),
        ]
        if cuda:
            cells.append(_fmt(r.get("peak_cuda_mib"), ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Matching: {result['matching']}."]
    searched = [r for r in rows if (r.get("search") or {}).get("evaluations")]
    if searched:
        windows = s.get("search_nsamples") or nsamples
        lines.append(f"Block searches score candidates on {windows} × {seqlen} calibration tokens "
                     f"(search dtype {s.get('search_dtype', 'auto')}): "
                     + "; ".join(f"{r['method']} at {r['ratio']:.2f}: {r['search']['evaluations']:,} evaluations "
                                 f"in {r['search']['search_s']:.0f} s" for r in searched) + ".")
    for r in rows:
        a = r.get("allocation_search")
        if a:
            t = a.get("time_s") or {}
            lines.append(f"{r['method']} at {r['ratio']:.2f}: start {a['starts'].get('chosen')}, KL "
                         f"{a['kl']['start']:.4f} → {a['kl']['best']:.4f} (stitched candidates) in {a['generations']} generations "
                         f"({a['stopped_by']}); database {t.get('database', 0):.0f} s, search {t.get('search', 0):.0f} s.")
    for r in rows:
        if r.get("auto"):
            lines.append(format_auto(r["method"], r["ratio"], r["auto"]))
    if task_names:
        lines.append("Zero-shot: accuracy in %, acc_norm where the task reports it, else acc (lm-eval).")
    return "\n".join(lines)
