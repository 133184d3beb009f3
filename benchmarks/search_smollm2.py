"""Searched allocation on the default model: collect the CLI runs, and build the stitched alternative.

Step 1, the measured runs (each prints and saves its perplexities in OUT/eval.json):

    slimgpt prune --schedule search --ratio 0.2 --ppl --ppl-windows 256 --out /tmp/s20
    slimgpt prune --schedule search --ratio 0.5 --ppl --ppl-windows 256 --out /tmp/s50

Step 2, this script: reads each run's ``slimgpt.json`` / ``eval.json`` and, with ``--stitch``,
rebuilds the level database with the run's settings and evaluates the model made by *stitching*
the stored dense-input variants at the same found allocation (``--search-final stitch``), so the
two ways of realising one allocation are compared on the same levels:

    python benchmarks/search_smollm2.py --runs /tmp/s20 /tmp/s50 --stitch --ppl-windows 256

``--refs`` adds other saved runs at the same ratios as rows of the table (e.g. the uniform schedule:
``slimgpt prune --schedule uniform --ratio 0.2 --ppl --ppl-windows 256 --out /tmp/U20``):

    python benchmarks/search_smollm2.py --runs /tmp/S20 /tmp/S50 --refs /tmp/U20 /tmp/U50

Writes ``benchmarks/results/search_smollm2.json`` and ``.md``. The log-schedule rows (256 windows,
same 64 × 512 C4 calibration) are the README's SlimGPT table (``ppl_protocols_smollm2.json``):
dense 54.22, log 20 % 114.79, 50 % 490.01.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

LOG_REFERENCE = {"dense": 54.22, "0.2": 114.79, "0.5": 490.01}


def model_kl(dense: Any, model: Any, windows: Any) -> float:
    """Mean per-token KL(dense || model) on ``windows`` in float32 (the search's fitness, exact)."""
    import torch
    import torch.nn.functional as F

    from slimgpt.search.fitness import token_kl

    total = 0.0
    with torch.no_grad():
        for ids in windows:
            p = F.log_softmax(dense(ids[None]).logits.float(), -1)
            q = F.log_softmax(model(ids[None]).logits.float(), -1)
            total += float(token_kl(p, q).mean())
    return total / len(windows)


def stitched_ppl(run: dict[str, Any], folder: Path, windows: int, db_folder: str | None = None) -> dict[str, Any]:
    """The stitched model at the run's found levels (database rebuilt with the run's settings and
    search dtype, so the same variants), its perplexity, and the float32 KL of both the stitched
    and the run's own (rerun) model on the search's last-stage windows."""
    import copy
    import math

    import torch

    from slimgpt.arch import get_adapter
    from slimgpt.config import PruneConfig
    from slimgpt.data.calibration import sample_calibration
    from slimgpt.driver import layer_spaces
    from slimgpt.evaluation.perplexity import perplexity
    from slimgpt.io import load_pruned
    from slimgpt.methods.searched import stitch
    from slimgpt.search.database import LevelDatabase, build_database, dense_mlp_hessian
    from slimgpt.search.levels import make_problem, widths_for
    from slimgpt.surgery import parameter_count, shrink_model
    from slimgpt.twin import search_adapter
    from slimgpt.zoo import load_model

    cfg = PruneConfig(**{k: v for k, v in run["config"].items() if k in PruneConfig.__dataclass_fields__})
    model, tok = load_model(cfg.model)
    dense_model = copy.deepcopy(model).eval()
    calib, _ = sample_calibration(cfg.calib, tok, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.data_dir)
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    dense = parameter_count(model)
    search = run["method"]["search"]
    search_dtype = getattr(torch, search.get("search_dtype", "float32"))
    cpu = torch.device("cpu")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, search_adapter(ad, cpu, search_dtype) as fast:
        if db_folder:  # a copy of the run's own OUT.search.db (same settings and calibration)
            db = LevelDatabase(Path(db_folder), json.loads((Path(db_folder) / "index.json").read_text()))
        else:
            db = build_database(ad, calib, spaces, cpu, Path(d) / "db", {},
                                levels=search.get("levels_per_block"), ffn_step=search.get("ffn_step"),
                                damp=cfg.damp, head_score=cfg.head_score, batch_size=cfg.batch_size, forward=fast)
        p = make_problem(spaces, cfg.ratio * dense, attn_removed=db.attn_removed, ffn_kept=db.ffn_levels)
        alloc = widths_for(p, spaces, search["levels"], db.attn_shapes, db.ffn_levels)
        H_fix = dense_mlp_hessian(fast, calib, cpu, alloc.fixup_layer, cfg.batch_size) \
            if alloc.fixup_layer is not None else None
        plans = stitch(ad, db, search["levels"], alloc.fixup_layer, alloc.widths, cfg.damp, lambda i: H_fix)
        slim = shrink_model(model, plans)
    build_s = time.perf_counter() - t
    kl_windows = calib[: math.ceil(search_kl(search)["tokens"] / calib.shape[1])]
    rerun, _ = load_pruned(folder)
    out = {"build_s": build_s, "search_dtype": str(search_dtype).removeprefix("torch."),
           "kl_windows": int(kl_windows.shape[0]), "kl_stitched_fp32": model_kl(dense_model, slim.eval(), kl_windows),
           "kl_rerun_fp32": model_kl(dense_model, rerun.eval(), kl_windows), "params": parameter_count(slim)}
    ppl = perplexity(slim, tok, "wikitext2", seqlen=128, max_windows=windows)
    return {"ppl": ppl["ppl"], "windows": ppl["windows"], **out}


def search_kl(search: dict[str, Any]) -> dict[str, Any]:
    """The search's ``kl`` record under today's names. Runs before issue 35 wrote ``final`` for the best
    stitched candidate's KL (not the saved rerun model's), and ``windows`` for the last stage's token
    count once the stages were counted in tokens (before that, 16 was a count of windows)."""
    kl = dict(search["kl"])
    if "final" in kl:
        kl["best"] = kl.pop("final")
    if "windows" in kl and kl["windows"] == (search.get("stage_tokens") or [None])[-1]:
        kl["tokens"] = kl.pop("windows")
    kl.setdefault("of", "stitched candidates")
    return kl


def _eval_ppl(folder: Path) -> dict[str, float | None]:
    ev = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else {}
    return {e["label"]: e.get("ppl", {}).get("128", {}).get("ppl") for e in ev.get("models", ev.get("entries", []))}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """One table: per ratio, the log schedule, each reference run and the searched allocation."""
    dense = LOG_REFERENCE["dense"]
    lines = ["| ratio | allocation | removed | WikiText-2 PPL (seq 128, 256 windows) | × dense | prune s | search |",
             "|---|---|---:|---:|---:|---:|---|"]
    for ratio, run in sorted(result["runs"].items()):
        rows = [("log (paper, Eq. 6)", None, LOG_REFERENCE.get(ratio), None, "")]
        for label, ref in sorted((result.get("references") or {}).get(ratio, {}).items()):
            rows.append((label, ref["removed_ratio"], ref["pruned_ppl"], ref["prune_total_s"], ""))
        kl = search_kl(run)
        rows.append(("searched (`--schedule search`)", run["removed_ratio"], run["pruned_ppl"], run["prune_total_s"],
                     f"start {run['starts']['chosen']}, KL of the stitched candidates {kl['start']:.4f} → "
                     f"{kl['best']:.4f} in "
                     f"{run['generations']} generations; database "
                     + (f"{run['time_s']['database']:.0f} s, " if run["time_s"]["database"] >= 1 else
                        "reused (built by an earlier run with the same calibration), ")
                     + f"starts {run['time_s']['starts']:.0f} s, "
                     f"search {run['time_s']['search']:.0f} s"))
        for label, removed, ppl, secs, note in rows:
            lines.append(f"| {float(ratio):.2f} | {label} | {'–' if removed is None else f'{removed:.2%}'} | "
                         f"{'–' if ppl is None else f'{ppl:.2f}'} | {'–' if ppl is None else f'{ppl / dense:.2f}'} | "
                         f"{'–' if secs is None else f'{secs:.0f}'} | {note} |")
    lines += ["", f"Dense {dense:.2f}. SmolLM2-135M, C4 64 × 512 calibration, cpu float32, "
              f"{result.get('torch_threads', 2)} torch threads."]
    both = {r: run for r, run in sorted(result["runs"].items()) if "kl_rerun_fp32" in (run.get("stitched") or {})}
    if both:
        lines += ["", "**Score what you build, or build what you score** (one search, its allocation realised both "
                  "ways; KL(dense ‖ model) in float32 on the search's last-stage windows):", "",
                  "| ratio | search KL (stitched candidate, search dtype) | stitched: KL / PPL | "
                  "rerun (sequential SlimGPT): KL / PPL |", "|---|---:|---:|---:|"]
        for ratio, run in both.items():
            st = run["stitched"]
            lines.append(f"| {float(ratio):.2f} | {search_kl(run)['best']:.4f} ({st['search_dtype']}) | "
                         f"{st['kl_stitched_fp32']:.4f} / {st['ppl']:.2f} | "
                         f"{st['kl_rerun_fp32']:.4f} / {run['pruned_ppl']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="output folders of `slimgpt prune --schedule search`")
    ap.add_argument("--refs", nargs="*", default=[], help="other saved runs (with --ppl) to put beside them")
    ap.add_argument("--stitch", action="store_true", help="also evaluate the stitched model at each found allocation")
    ap.add_argument("--ppl-windows", type=int, default=256)
    ap.add_argument("--db", nargs="*", default=[], help="per run: a copy of its OUT.search.db to stitch from")
    ap.add_argument("--out", default="benchmarks/results/search_smollm2.json")
    a = ap.parse_args()
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    result["log_schedule_reference"] = LOG_REFERENCE
    for folder in map(Path, a.refs):
        run = json.loads((folder / "slimgpt.json").read_text())
        ratio = str(run["config"]["ratio"])
        label = f"{run['config']['schedule']} schedule"
        result.setdefault("references", {}).setdefault(ratio, {})[label] = {
            "command": f"slimgpt prune --schedule {run['config']['schedule']} --ratio {ratio} --ppl --ppl-windows "
                       f"{a.ppl_windows} --out {folder}",
            "pruned_ppl": _eval_ppl(folder).get("pruned"), "removed_ratio": run["params"]["removed_ratio"],
            "prune_total_s": run["time_s"]["prune_total"]}
    for k, folder in enumerate(map(Path, a.runs)):
        run = json.loads((folder / "slimgpt.json").read_text())
        ppl = _eval_ppl(folder)
        s = run["method"]["search"]
        ratio = run["config"]["ratio"]
        result["torch_threads"] = run["torch_threads"]
        entry = {
            "command": f"slimgpt prune --schedule search --ratio {ratio} --ppl --ppl-windows {a.ppl_windows} "
                       f"--out {folder}",
            "dense_ppl": ppl.get("dense"), "pruned_ppl": ppl.get("pruned"), "final": s["final"],
            "log_schedule_ppl": LOG_REFERENCE.get(str(ratio)),
            "removed_ratio": run["params"]["removed_ratio"], "params_off_by": s["params"]["off_by"],
            "kl": search_kl(s), "starts": s["starts"], "generations": s["generations"], "stopped_by": s["stopped_by"],
            "improvements": s["improvements"], "evaluations": s["evaluations"], "time_s": s["time_s"],
            "prune_total_s": run["time_s"]["prune_total"], "torch_threads": run["torch_threads"],
            "history": s.get("history"),
            "allocation": [(r["heads"], r["kv_heads"], r["channels"]) for r in s["allocation"]],
        }
        if a.stitch:
            entry["stitched"] = stitched_ppl(run, folder, a.ppl_windows, a.db[k] if k < len(a.db) else None)
        if entry.get("pruned_ppl") is None:  # run without --ppl: evaluate the saved model
            from slimgpt.evaluation.perplexity import perplexity
            from slimgpt.io import load_pruned

            model, tok = load_pruned(folder)
            entry["pruned_ppl"] = perplexity(model, tok, "wikitext2", seqlen=128, max_windows=a.ppl_windows)["ppl"]
            entry["dense_ppl"] = entry["dense_ppl"] or LOG_REFERENCE["dense"]
        result["runs"][str(ratio)] = entry
        print(json.dumps({k: v for k, v in entry.items() if k not in ("allocation", "history")}, indent=1))
    out.write_text(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
