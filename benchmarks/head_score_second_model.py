"""``--head-score gcd`` vs ``gcd-exact`` on a second model (issue 14's side question).

On SmolLM2-135M at 50 % ``gcd-exact`` beat the paper's ``gcd`` on 3 of 3 seeds (610 vs 822). This
re-measures it on Qwen2.5-Coder-0.5B (zoo ``qwen2.5-0.5b``, 14 / 2 heads) with a small calibration
so it fits a shared 2-core CPU: the dense model is loaded once, each variant prunes a deep copy.

    python benchmarks/head_score_second_model.py --model qwen2.5-0.5b --ratio 0.5 --seeds 0 \
        --nsamples 16 --seqlen 256 --ppl-windows 32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.evaluation.perplexity import perplexity
from slimgpt.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/head_score_qwen2.5-0.5b.json")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    result = {"model": a.model, "ratio": a.ratio, "calibration": f"c4 {a.nsamples}x{a.seqlen}",
              "ppl": f"wikitext2 seq 128, first {a.ppl_windows} windows", "runs": []}
    t = time.perf_counter()
    result["dense_ppl"] = perplexity(model, tok, "wikitext2", seqlen=128, max_windows=a.ppl_windows)["ppl"]
    result["dense_s"] = time.perf_counter() - t
    print(f"dense {result['dense_ppl']:.2f}", flush=True)
    for seed in (int(s) for s in a.seeds.split(",")):
        for score in ("gcd", "gcd-exact"):
            cfg = PruneConfig(model=a.model, ratio=a.ratio, head_score=score, schedule="log", nsamples=a.nsamples, seqlen=a.seqlen,
                              seed=seed)
            t = time.perf_counter()
            res = prune(cfg, model=copy.deepcopy(model), tokenizer=tok, progress=False)
            ppl = perplexity(res.model, tok, "wikitext2", seqlen=128, max_windows=a.ppl_windows)["ppl"]
            run = {"seed": seed, "head_score": score, "ppl": ppl, "removed_ratio": res.report["params"]["removed_ratio"],
                   "seconds": time.perf_counter() - t}
            result["runs"].append(run)
            print(run, flush=True)
            del res
            Path(a.out).write_text(json.dumps(result, indent=1))
    by = {s: [r["ppl"] for r in result["runs"] if r["head_score"] == s] for s in ("gcd", "gcd-exact")}
    result["geomean"] = {s: math.exp(sum(map(math.log, v)) / len(v)) for s, v in by.items() if v}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(result["geomean"])


if __name__ == "__main__":
    main()
