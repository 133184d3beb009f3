"""The README's SlimGPT results table: dense vs SlimGPT on the default model at 20 % and 50 %.

For each ratio: prune (time split into calibration forward / Hessian / solver, peak memory),
then WikiText-2 perplexity at seq 128 (the paper's setting) for the dense and pruned models.
Writes JSON and a Markdown table.

    python benchmarks/slimgpt_results.py --ratios 0.2,0.5 --out benchmarks/results/slimgpt_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.evaluation.perplexity import perplexity
from slimgpt.surgery import parameter_count
from slimgpt.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--nsamples", type=int, default=None, help="default: the CPU/GPU default of slimgpt prune")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--extra", default="", help="extra PruneConfig fields as k=v,k=v (e.g. head_score=initial)")
    ap.add_argument("--out", default="benchmarks/results/slimgpt_smollm2")
    a = ap.parse_args()

    extra = dict(kv.split("=", 1) for kv in a.extra.split(",") if kv)
    extra.setdefault("schedule", "log")  # the paper's Table 1 setting, whatever the default
    dense, tok = load_model(a.model)
    rows = []
    t = time.perf_counter()
    ppl = perplexity(dense, tok, "wikitext2", seqlen=128, max_windows=a.max_windows, data_dir=a.data_dir)
    rows.append({"model": "dense", "ratio": 0.0, "params": parameter_count(dense), "ppl128": ppl["ppl"],
                 "eval_windows": ppl["windows"], "eval_s": time.perf_counter() - t})
    for r in [float(x) for x in a.ratios.split(",")]:
        cfg = PruneConfig(model=a.model, ratio=r, nsamples=a.nsamples, seqlen=a.seqlen, data_dir=a.data_dir, **extra)
        res = prune(cfg, model=copy.deepcopy(dense), tokenizer=tok)
        ppl = perplexity(res.model, tok, "wikitext2", seqlen=128, max_windows=a.max_windows, data_dir=a.data_dir)
        rep = res.report
        rows.append({
            "model": f"slimgpt {r:.0%}", "ratio": r, "params": rep["params"]["pruned"], "ppl128": ppl["ppl"],
            "eval_windows": ppl["windows"], "time_s": rep["time_s"], "memory": rep["memory"],
            "calibration": {"nsamples": rep["config"]["nsamples"], "seqlen": rep["config"]["seqlen"],
                            "source": rep["config"]["calib"]},
            "layers": rep["layers"],
        })
        del res
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": a.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "ppl_protocol": ppl["protocol"], "command": " ".join(__import__("sys").argv)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = ["| model | params | WikiText-2 PPL (seq 128) | prune time (s) | forward / Hessian / solver (s) | solver ÷ forward | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "time_s" in row:
            ts, m = row["time_s"], row["memory"]
            lines.append(f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['ppl128']:.2f} | {ts['prune_total']:.0f} | "
                         f"{ts['calibration_forward']:.0f} / {ts['hessian']:.0f} / {ts['solver']:.0f} | "
                         f"{ts['solver_over_forward']:.2f} | {m['peak_rss_mib']:.0f} |")
        else:
            lines.append(f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['ppl128']:.2f} | - | - | - | - |")
    lines.append(f"\n{rows[0]['eval_windows']} windows of 128 tokens; {meta['ppl_protocol']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
