"""``slimgpt report RUN_DIR``: a Markdown report with PNG plots of one pruning run.

Reads the pruned folder's ``slimgpt.json`` (written by :func:`slimgpt.api.prune`) and any eval
JSONs beside it (``slimgpt eval --json``, ``prune --eval``), and draws:

* ``layer_ratios.png`` (paper Fig. 4): per layer, the schedule's target ratio against the share
  of the layer's parameters actually removed, and the shares of query heads, key/value heads and
  FFN channels kept. The two differ because heads come in whole ``head_dim`` blocks.
* ``layer_error.png`` (paper Fig. 2): per layer ``l``, the relative output error
  ``Σ‖h_l^pruned − h_l^dense‖² / Σ‖h_l^dense‖²`` over the tokens of a few held-out windows (8 ×
  128 WikiText-2 test tokens by default). It needs the dense source model (``config.model`` in
  slimgpt.json). Outputs are taken by forward hooks on the decoder layers rather than from
  ``output_hidden_states``, whose last entry is after the final norm, not the last layer's output.
* ``ppl.png`` / ``zeroshot.png``: dense vs pruned perplexity and accuracies, when eval results are
  available.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from slimgpt.errors import ConfigError, ModelError, SlimGPTError

log = logging.getLogger(__name__)

LAYER_RATIOS_PNG = "layer_ratios.png"
LAYER_ERROR_PNG = "layer_error.png"
PPL_PNG = "ppl.png"
ZEROSHOT_PNG = "zeroshot.png"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
MASSIVE = 100.0
"""A token whose squared output norm exceeds this × the median token's holds a 'massive activation'."""


# --------------------------------------------------------------------------- inputs
def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The run metadata (slimgpt.json) of a pruned folder."""
    meta = Path(run_dir) / "slimgpt.json"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir} does not exist; give a folder written by `slimgpt prune`")
    if not meta.is_file():
        raise ConfigError(f"{run_dir} has no slimgpt.json; give a folder written by `slimgpt prune`")
    try:
        run = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta} is not valid JSON ({e.msg}); re-run the pruning") from None
    if not run.get("layers"):
        raise ConfigError(f"{meta} has no per-layer records; it was not written by `slimgpt prune`")
    return run


def find_eval_results(run_dir: str | Path, paths: list[str] | None = None) -> list[dict[str, Any]]:
    """Eval JSONs to plot: the given files, else every ``*.json`` in the folder of the eval kind."""
    from slimgpt.evaluation.results import EVAL_KIND

    candidates = [Path(p) for p in paths] if paths else sorted(Path(run_dir).glob("*.json"))
    docs = []
    for p in candidates:
        if paths and not p.is_file():
            raise ConfigError(f"eval JSON {p} not found")
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            if paths:
                raise ConfigError(f"{p} is not valid JSON; give a file written by `slimgpt eval --json`") from None
            continue
        if isinstance(doc, dict) and doc.get("kind") == EVAL_KIND:
            docs.append({**doc, "path": str(p)})
        elif paths:
            raise ConfigError(f"{p} is not an eval result; give a file written by `slimgpt eval --json`")
    return docs


def merge_models(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """label → merged results ("dense", "pruned", ...): later files fill in what earlier ones lack."""
    merged: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for e in doc.get("models", []):
            m = merged.setdefault(e["label"], {"label": e["label"], "model": e.get("model"),
                                               "params": e.get("params", 0), "ppl": {}})
            m["ppl"].update(e.get("ppl") or {})
            if e.get("zeroshot") and not m.get("zeroshot"):
                m["zeroshot"] = e["zeroshot"]
    return merged


# --------------------------------------------------------------------------- per-layer error
def _layer_outputs(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """The output hidden state of every decoder layer (forward hooks), in layer order."""
    from slimgpt.arch import get_adapter

    outs: list[torch.Tensor] = []

    def hook(_mod: Any, _inp: Any, out: Any) -> None:
        outs.append((out[0] if isinstance(out, tuple) else out).detach().double())

    handles = [layer.register_forward_hook(hook) for layer in get_adapter(model).layers]
    try:
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


@torch.no_grad()
def layer_error_stats(dense: Any, pruned: Any, windows: torch.Tensor, batch_size: int = 4) -> dict[str, list[float]]:
    """Per layer, how far the pruned model's output hidden state is from the dense one's.

    ``relative``: ``Σ‖h_l^p − h_l^d‖² / Σ‖h_l^d‖²`` over all tokens (paper Fig. 2).
    ``median_token``: the median over tokens of the same ratio taken per token. The sum is
    dominated by tokens with massive activations (in SmolLM2 the first token of a window reaches a
    norm ~150× the others from layer 11 on), so the median shows what a typical token sees.
    ``massive_share``: the share of ``Σ‖h_l^d‖²`` held by tokens whose squared norm exceeds
    :data:`MASSIVE` × the median token's, which tells when the summed ratio is really about them.
    ``first_token_share``: the share held by the first token of each window. These are the
    "massive activations" of Sun et al. (2024): from some layer on, the first token (the
    attention sink) carries a few hidden channels orders of magnitude larger than any other token's.
    """
    if windows.ndim != 2 or len(windows) == 0:
        raise ConfigError("layer_output_errors needs a non-empty (windows, seqlen) tensor of token ids")
    modes = (dense.training, pruned.training)
    dense.eval()
    pruned.eval()
    err_tok: list[list[torch.Tensor]] = []
    norm_tok: list[list[torch.Tensor]] = []
    first_tok: list[list[torch.Tensor]] = []
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size]
            hd, hp = _layer_outputs(dense, ids), _layer_outputs(pruned, ids)
            if len(hd) != len(hp):
                raise ModelError(f"the dense model has {len(hd)} layers and the pruned one {len(hp)}; "
                                 "give the model this folder was pruned from (--dense)")
            if not err_tok:
                err_tok, norm_tok, first_tok = [[] for _ in hd], [[] for _ in hd], [[] for _ in hd]
            for i, (d, p) in enumerate(zip(hd, hp)):
                err_tok[i].append((p.to(d.device) - d).pow(2).sum(-1).flatten().cpu())
                norm_tok[i].append(d.pow(2).sum(-1).flatten().cpu())
                first_tok[i].append(d[:, 0].pow(2).sum(-1).cpu())
    finally:
        dense.train(modes[0])
        pruned.train(modes[1])
    stats: dict[str, list[float]] = {"relative": [], "median_token": [], "massive_share": [], "first_token_share": []}
    for e, n, f in zip(err_tok, norm_tok, first_tok):
        e, n = torch.cat(e), torch.cat(n)
        total = float(n.sum())
        stats["first_token_share"].append(float(torch.cat(f).sum()) / total if total > 0 else 0.0)
        stats["relative"].append(float(e.sum()) / total if total > 0 else math.inf)
        stats["median_token"].append(float((e / n.clamp_min(1e-30)).median()))
        massive = n > MASSIVE * n.median()
        stats["massive_share"].append(float(n[massive].sum()) / total if total > 0 else 0.0)
    return stats


def layer_output_errors(dense: Any, pruned: Any, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Relative squared error of each layer's output, pruned vs dense, summed over all tokens:
    ``Σ‖h_l^p − h_l^d‖² / Σ‖h_l^d‖²`` (paper Fig. 2)."""
    return layer_error_stats(dense, pruned, windows, batch_size)["relative"]


def _error_windows(tokenizer: Any, error_data: str, windows: int, seqlen: int, data_dir: str | None) -> torch.Tensor:
    from slimgpt.evaluation.perplexity import eval_text, eval_windows

    text, _ = eval_text(error_data, data_dir)
    ids, _ = eval_windows(tokenizer, text, seqlen, windows)
    return ids


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("matplotlib is needed for the report plots: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _frac(text: str) -> float:
    kept, total = (int(x) for x in str(text).split("/"))
    return kept / total if total else 0.0


def plot_layer_ratios(layers: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Paper Fig. 4: target (schedule) vs actual pruning ratio per layer, and what each layer keeps."""
    plt = _plt()
    idx = [r["layer"] for r in layers]
    actual = [1 - r["params_kept"] for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.bar(idx, actual, color="#7aa6d6", label="actual: share of the layer's parameters removed")
    sched = [r.get("schedule_ratio") for r in layers]
    if any(s is not None for s in sched):
        ax1.plot(idx, [math.nan if s is None else s for s in sched], "o-", color="#d9541e", lw=2, ms=4,
                 label="schedule (target) ratio")
    ax1.set_ylabel("pruning ratio")
    ax1.set_ylim(0, 1.0)
    ax1.set_title(title)
    ax1.legend(loc="upper left", fontsize=9)
    ax2.step(idx, [_frac(r["heads"]) for r in layers], where="mid", lw=2, label="query heads kept")
    ax2.step(idx, [_frac(r["kv_heads"]) for r in layers], where="mid", lw=1.5, ls="--", label="key/value heads kept")
    ax2.step(idx, [_frac(r["channels"]) for r in layers], where="mid", lw=2, label="FFN channels kept")
    ax2.set_ylabel("share kept")
    ax2.set_ylim(-0.03, 1.05)
    ax2.set_xlabel("layer")
    ax2.legend(loc="lower left", fontsize=9, ncol=3)
    _integer_ticks(ax2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layer_errors(stats: dict[str, list[float]], path: Path, title: str) -> Path:
    """Paper Fig. 2: relative output error per layer (log scale: it grows by orders of magnitude).
    The median token's error leads: the paper's sum over tokens is, from the layer where massive
    first-token activations appear, mostly the error on that one token (see :func:`layer_error_stats`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for key, label, style in (("median_token", "typical token: median of ‖h_pruned − h_dense‖² / ‖h_dense‖²", "o-"),
                              ("relative", "all tokens summed (paper Fig. 2): Σ‖h_pruned − h_dense‖² / Σ‖h_dense‖²",
                               "s--")):
        vals = [e if math.isfinite(e) and e > 0 else math.nan for e in stats[key]]
        ax.plot(range(len(vals)), vals, style, lw=2, ms=4, label=label)
    if any(e > 0 for e in stats["relative"] + stats["median_token"] if math.isfinite(e)):
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    _integer_ticks(ax)
    ax.set_ylabel("relative squared error")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str], fmt: str) -> None:
    bars = ax.bar(labels, values, color=colors)
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")


_COLORS = {"dense": "#8c8c8c", "pruned": "#2b7bba", "model": "#2b7bba"}


def plot_ppl(models: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of perplexity per window length, one bar per model."""
    seqlens = sorted({int(s) for m in models.values() for s in m["ppl"]})
    if not seqlens:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(seqlens), figsize=(4 + 2.2 * len(seqlens), 4), squeeze=False)
    for ax, s in zip(axes[0], seqlens):
        have = [(k, m["ppl"][str(s)]) for k, m in models.items() if str(s) in m["ppl"]]
        labels = [k for k, _ in have]
        _bars(ax, labels, [r["ppl"] for _, r in have], [_COLORS.get(k, "#e6862c") for k in labels], "{:.2f}")
        name = have[0][1].get("dataset", {}).get("name", "") if have else ""
        windows = have[0][1].get("windows", "?") if have else "?"
        ax.set_title(f"{name} perplexity, seq {s} ({windows} windows)", fontsize=10)
        ax.set_ylabel("perplexity (lower is better)")
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_zeroshot(models: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: accuracy per task and the average, one colour per model."""
    scored = {k: m["zeroshot"] for k, m in models.items() if m.get("zeroshot")}
    if not scored:
        return None
    plt = _plt()
    tasks: list[str] = []
    for z in scored.values():
        tasks += [t for t in z["tasks"] if t not in tasks]
    groups = [*tasks, "average"]
    width = 0.8 / len(scored)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.5))
    for j, (label, z) in enumerate(scored.items()):
        vals = [z["tasks"][t]["score"] if t in z["tasks"] and z["tasks"][t].get("score") is not None else math.nan
                for t in tasks] + [z.get("average") if z.get("average") is not None else math.nan]
        xs = [i + (j - (len(scored) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [100 * v for v in vals], width, label=label, color=_COLORS.get(label))
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(f"{100 * v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    z0 = next(iter(scored.values()))
    ax.set_title(f"{z0.get('num_fewshot', 0)}-shot accuracy (acc_norm where reported)"
                 + (f", limit {z0['limit']}" if z0.get("limit") is not None else ""), fontsize=10)
    ax.set_ylim(0, min(100.0, 1.25 * ax.get_ylim()[1]))
    ax.legend(loc="upper right", ncol=len(scored), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report
def _ranges(idx: list[int]) -> str:
    """[3, 4, 5, 9] → "3–5, 9"."""
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}–{a}")
            start = b
    return ", ".join(out)


def _layer_table(layers: list[dict[str, Any]], stats: dict[str, list[float]] | None) -> list[str]:
    head = "| layer | schedule ratio | removed | heads | kv heads | channels |" + (
        " output error (sum) | (median token) |" if stats else "")
    rows = [head, "|---:|---:|---:|---|---|---|" + ("---:|---:|" if stats else "")]
    for r in layers:
        s = "–" if r.get("schedule_ratio") is None else f"{r['schedule_ratio']:.3f}"
        i = r["layer"]
        e = f" {stats['relative'][i]:.3g} | {stats['median_token'][i]:.3g} |" if stats else ""
        rows.append(f"| {r['layer']} | {s} | {1 - r['params_kept']:.1%} | {r['heads']} | {r['kv_heads']} "
                    f"| {r['channels']} |{e}")
    return rows



def _target(params: dict) -> str:
    """``target 20.0%`` for a ratio run, ``target 12 blocks`` for ``--blocks``."""
    if params.get("target_ratio") is not None:
        return f"target {params['target_ratio']:.1%}"
    if params.get("target_blocks"):
        return f"target {params['target_blocks']} blocks"
    return "target ?"

def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    dense: str | tuple[Any, Any] | None = None,
    pruned: tuple[Any, Any] | None = None,
    error_data: str = "auto",
    error_windows: int = 8,
    error_seqlen: int = 128,
    layer_error: bool = True,
    eval_jsons: list[str] | None = None,
    data_dir: str | None = None,
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs for the pruned folder ``run_dir``.

    ``dense`` is the source model: a name/folder, a loaded ``(model, tokenizer)``, or ``None`` for
    slimgpt.json's ``config.model``. ``pruned`` is the pruned ``(model, tokenizer)`` if already in
    memory (else loaded from ``run_dir``). When the dense model cannot be loaded, the per-layer
    error is left out and the report says why. Returns the path of report.md.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    if error_windows < 1 or error_seqlen < 2:
        raise ConfigError("--error-windows must be >= 1 and --error-seqlen >= 2")
    cfg, params, layers = run.get("config", {}), run.get("params", {}), run["layers"]
    method = run.get("method", {}).get("name", cfg.get("method", "?"))
    source = cfg.get("model", "?")
    title = f"{method} on {source}: {params.get('removed_ratio', 0):.1%} of parameters removed"
    figures: dict[str, Path] = {"ratios": plot_layer_ratios(layers, out / LAYER_RATIOS_PNG, title)}

    errors: dict[str, list[float]] | None = None
    error_note = ""
    if layer_error:
        try:
            errors, error_note = _compute_errors(run_dir, source, dense, pruned, error_data, error_windows,
                                                 error_seqlen, data_dir, cfg.get("calib"))
        except SlimGPTError as e:
            if dense is not None:  # asked for explicitly: the user should hear it failed
                raise
            error_note = f"Per-layer output error not computed: {e}"
            log.warning("%s", error_note)
        if errors is not None:
            figures["error"] = plot_layer_errors(errors, out / LAYER_ERROR_PNG,
                                                 f"Per-layer output error vs the dense model ({error_note})")

    models = merge_models(find_eval_results(run_dir, eval_jsons))
    for key, fn, name in (("ppl", plot_ppl, PPL_PNG), ("zeroshot", plot_zeroshot, ZEROSHOT_PNG)):
        p = fn(models, out / name)
        if p is not None:
            figures[key] = p

    md = [f"# Pruning report: {run_dir.name}", "", f"{title}.", ""]
    md += [
        f"- parameters: {params.get('dense', 0):,} → {params.get('pruned', 0):,} "
        f"({_target(params)}, removed {params.get('removed_ratio', 0):.2%})",
        f"- schedule `{cfg.get('schedule')}`, calibration `{cfg.get('calib')}` "
        f"{cfg.get('nsamples')} × {cfg.get('seqlen')} tokens, seed {cfg.get('seed')}, "
        f"head score `{cfg.get('head_score')}`, FFN groups `{cfg.get('ffn_groups')}`",
    ]
    t = run.get("time_s", {})
    if t:
        md.append(f"- pruning time {t.get('prune_total', 0):.1f} s on {run.get('device', '?')} "
                  f"({run.get('dtype', '?')}, {run.get('torch_threads', '?')} threads)")
    md += ["", "## Per-layer pruning ratio (paper Fig. 4)", "", f"![per-layer pruning ratio]({LAYER_RATIOS_PNG})", ""]
    if "error" in figures:
        md += ["## Per-layer output error (paper Fig. 2)", "",
               f"Relative squared error of each layer's output hidden state, {error_note}.", "",
               f"![per-layer output error]({LAYER_ERROR_PNG})", ""]
        assert errors is not None
        heavy = [i for i, share in enumerate(errors["massive_share"]) if share > 0.5]
        if heavy:
            first = errors.get("first_token_share") or [0.0] * len(errors["massive_share"])
            share = min(first[i] for i in heavy)
            who = (f"the first token of every window (at least {share:.0%} of it)" if share > 0.5
                   else f"tokens whose squared norm exceeds {MASSIVE:.0f}× the median token's")
            md += [f"In layers {_ranges(heavy)} the dense model's output norm is held by {who}: these are "
                   "*massive activations* (Sun et al., 2024), a few hidden channels of the attention-sink token "
                   "that grow by orders of magnitude and act as a fixed bias. The summed error there mostly "
                   "measures that one token; the median-token curve (solid) shows what a typical token sees.", ""]
    elif error_note:
        md += ["## Per-layer output error", "", error_note, ""]
    if "ppl" in figures or "zeroshot" in figures:
        from slimgpt.evaluation.results import ppl_table, zeroshot_table

        entries = list(models.values())
        md += ["## Evaluation", ""]
        if "ppl" in figures:
            md += [ppl_table(entries), "", f"![perplexity]({PPL_PNG})", ""]
        if "zeroshot" in figures:
            md += [zeroshot_table(entries), "", f"![zero-shot accuracy]({ZEROSHOT_PNG})", ""]
    md += ["## Layers", "", *_layer_table(layers, errors), ""]
    (out / REPORT_MD).write_text("\n".join(md))
    (out / REPORT_JSON).write_text(json.dumps({
        "run_dir": str(run_dir), "layer_output_error": errors, "layer_output_error_data": error_note or None,
        "figures": {k: v.name for k, v in figures.items()}, "eval": {k: {"ppl": {s: r["ppl"] for s, r in m["ppl"].items()},
        "zeroshot_average": (m.get("zeroshot") or {}).get("average")} for k, m in models.items()},
    }, indent=2))
    return out / REPORT_MD


def _compute_errors(run_dir: Path, source: str, dense: str | tuple[Any, Any] | None, pruned: tuple[Any, Any] | None,
                    error_data: str, windows: int, seqlen: int, data_dir: str | None, calib: str | None = None
                    ) -> tuple[dict[str, list[float]], str]:
    from slimgpt.zoo import load_model

    if isinstance(dense, tuple):
        dmodel, dtok = dense
    else:
        dmodel, dtok = load_model(dense or source)
    if pruned is not None:
        pmodel, ptok = pruned
    else:
        from slimgpt.io import load_pruned

        pmodel, ptok = load_pruned(run_dir, dtype=next(dmodel.parameters()).dtype)
    from slimgpt.evaluation.perplexity import dataset_label, resolve_eval_dataset

    error_data = resolve_eval_dataset(error_data, data_dir, calib)
    ids = _error_windows(ptok if ptok is not None else dtok, error_data, windows, seqlen, data_dir)
    errors = layer_error_stats(dmodel, pmodel, ids)
    name = "WikiText-2 test" if error_data == "wikitext2" else dataset_label(error_data)
    return errors, f"{len(ids)} × {ids.shape[1]} tokens of {name}"
