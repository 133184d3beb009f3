"""The README speed table: dense vs SlimGPT-pruned default model, generation side by side (Table 4).

    python benchmarks/speed.py --ratios 0.2,0.5 --threads 1 --out benchmarks/results/speed_smollm2

Prunes the dense model (loaded once) to each ratio in memory, then times greedy generation of
``--new-tokens`` (paper Table 4: 512) after a ``--prompt-tokens`` prompt for all models in one
run, repeats interleaved across models (:func:`slimgpt.evaluation.bench.benchmark_generation`).
The pruned shapes come from the ratio schedule alone, so speed does not depend on the calibration
size: a small calibration set (default 8 × 128 tokens) keeps this cheap. Pass ``--pruned DIR`` to
time saved folders instead. ``--threads 1`` is the fair setting on a shared 2-core machine, where
two threads wait on each other at every small decode op.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.evaluation.bench import TABLE4_NEW_TOKENS, benchmark_generation, format_table
from slimgpt.zoo import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.5", help="prune in memory to these ratios ('' for none)")
    ap.add_argument("--pruned", action="append", default=[], help="also time this saved pruned folder")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=TABLE4_NEW_TOKENS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/speed_smollm2")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    dense, tok = load_model(a.model)
    models = [("dense", dense, tok)]
    for r in [float(x) for x in a.ratios.split(",") if x]:
        cfg = PruneConfig(model=a.model, ratio=r, nsamples=a.nsamples, seqlen=a.seqlen, data_dir=a.data_dir,
                          device="cpu", schedule="log")
        res = prune(cfg, model=copy.deepcopy(dense), tokenizer=tok, progress=False)
        models.append((f"slimgpt {r:.0%}", res.model, tok))
    for path in a.pruned:
        m, t = load_model(path)
        models.append((Path(path).name, m, t))
    t0 = time.perf_counter()
    result = benchmark_generation(models, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                                  repeats=a.repeats, warmup=a.warmup, num_threads=a.threads)
    result["wall_s"] = time.perf_counter() - t0
    result["command"] = " ".join(sys.argv)
    result["pruning_calibration"] = f"{a.nsamples} × {a.seqlen} C4 tokens (shapes depend on the ratio only)"
    table = format_table(result)
    try:
        import os

        load = os.getloadavg()
        result["load_average"] = load
        table += f"\n\nLoad average during the run (1/5/15 min at the end): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores."
    except OSError:
        pass
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
