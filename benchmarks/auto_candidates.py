"""Does ``--schedule auto``'s score pick the right allocation? Every candidate it considers, pruned
for real (sequential SlimGPT at the candidate's widths) and measured on WikiText-2, beside the
calibration KL that ``auto`` gave it. Writes JSON + Markdown.

    SLIMGPT_DATA=../shared/data python benchmarks/auto_candidates.py --model smollm2-135m --ratio 0.2 \\
        --out benchmarks/results/auto_candidates_smollm2_20

One ``auto`` run (its scores and time), then one prune + evaluation per candidate (the ``log``
candidate is the paper's schedule). Resumable: finished candidates are kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from slimgpt import pipeline
from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.evaluation.perplexity import perplexity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=256)
    ap.add_argument("--ppl-seqlen", default="128")
    ap.add_argument("--data-dir")
    ap.add_argument("--only", help="comma list of candidate names to prune (default: all)")
    ap.add_argument("--out", required=True, help="folder for candidates.json / candidates.md")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "candidates.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    base = dict(model=a.model, ratio=a.ratio, nsamples=a.nsamples, seqlen=a.seqlen, data_dir=a.data_dir)
    lengths = [int(x) for x in a.ppl_seqlen.split(",")]

    def evaluate(res) -> dict:
        return {str(L): perplexity(res.model, res.tokenizer, "wikitext2", seqlen=L,
                                   max_windows=a.max_windows if L == 128 else max(1, a.max_windows * 128 // L),
                                   data_dir=a.data_dir)["ppl"] for L in lengths}

    if "auto" not in doc:
        t = time.perf_counter()
        res = prune(PruneConfig(**base, schedule="auto"))
        wall = time.perf_counter() - t
        auto = res.report["method"]["auto"]
        doc["auto"] = {**auto, "prune_s": res.report["time_s"]["prune_total"], "wall_s": wall,
                       "ppl": evaluate(res), "prune_time_s": res.report["time_s"]}
        doc["settings"] = {**base, "max_windows": a.max_windows, "torch_threads": res.report["torch_threads"]}
        path.write_text(json.dumps(doc, indent=1))
    names = list(doc["auto"]["kl"])
    wanted = a.only.split(",") if a.only else names
    original = pipeline.plan_widths
    for name in wanted:
        if name in doc["rows"]:
            continue

        def fixed(run, name=name):  # the candidate's widths, from the same family code auto uses
            from slimgpt.allocation import candidates

            return candidates(run.spaces, run.dense_params, run.cfg.ratio, run.cfg.first_ratio)[name]

        pipeline.plan_widths = fixed
        try:
            t = time.perf_counter()
            res = prune(PruneConfig(**base, schedule="log"))
            wall = time.perf_counter() - t
        finally:
            pipeline.plan_widths = original
        doc["rows"][name] = {"kl": doc["auto"]["kl"][name], "ppl": evaluate(res), "prune_s": wall,
                             "params": res.report["params"]["pruned"]}
        path.write_text(json.dumps(doc, indent=1))
        del res
    lines = [f"# `--schedule auto` candidates: {a.model} at {a.ratio:.0%}", "",
             f"auto chose **{doc['auto']['chosen']}** in {doc['auto']['time_s']['total']:.1f} s "
             f"(whole prune {doc['auto']['prune_s']:.1f} s); WikiText-2 perplexity of the auto model: "
             + ", ".join(f"seq {k} {v:.2f}" for k, v in doc["auto"]["ppl"].items()), "",
             "| candidate | calibration KL | " + " | ".join(f"PPL seq {L}" for L in lengths) + " | prune s |",
             "|---|---|" + "---|" * len(lengths) + "---|"]
    for name, r in sorted(doc["rows"].items(), key=lambda kv: kv[1]["kl"]):
        lines.append(f"| {name} | {r['kl']:.4f} | " + " | ".join(f"{r['ppl'][str(L)]:.2f}" for L in lengths)
                     + f" | {r['prune_s']:.0f} |")
    (out / "candidates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
