"""BlockPruner search cost: exact fp32 search vs the bf16 search copy, on the same calibration.

    python benchmarks/blockpruner_search.py --rounds 3 --nsamples 4 --seqlen 128

Runs ``--rounds`` removal rounds of :func:`slimgpt.methods.blockpruner.block_search` once per search
dtype and writes, per dtype, the wall time, block passes (cached sweep) against what evaluating every
candidate from the embedding would need, the removal order, and how well the first round's
candidate perplexities agree with the fp32 ones (Spearman rank correlation, largest relative gap).
Times are from one run on whatever machine runs it; compare them only within one JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from slimgpt.arch import get_adapter
from slimgpt.data.calibration import get_calibration
from slimgpt.driver import layer_spaces
from slimgpt.methods.blockpruner import block_search
from slimgpt.twin import search_adapter
from slimgpt.zoo import load_model

OUT = Path(__file__).resolve().parent / "results" / "blockpruner_search.json"


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation without ties handling (candidate perplexities are distinct floats)."""
    def ranks(x: list[float]) -> list[int]:
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0] * len(x)
        for i, j in enumerate(order):
            r[j] = i
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)

    model, tok = load_model(a.model)
    calib = get_calibration("c4", tok, a.nsamples, a.seqlen, data_dir=a.data_dir)
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    device = torch.device("cpu")
    runs: dict[str, dict] = {}
    for name in a.dtypes.split(","):
        with search_adapter(adapter, device, getattr(torch, name)) as ad:
            t = time.perf_counter()
            res = block_search(ad, calib, spaces, device, n_blocks=a.rounds, progress=False)
            wall = time.perf_counter() - t
        runs[name] = {
            "wall_s": wall, "s_per_round": wall / a.rounds, "evaluations": res.evaluations,
            "block_passes": res.block_passes, "block_passes_from_embedding": res.block_passes_from_embedding,
            "removed": [s["block"] for s in res.steps], "ppl_after_each": [s["ppl"] for s in res.steps],
            "first_round_candidates": res.steps[0]["candidates"],
        }
        print(f"{name}: {wall:.1f} s for {a.rounds} rounds, removed {runs[name]['removed']}", flush=True)
    ref = runs.get("float32")
    if ref is not None:
        keys = list(ref["first_round_candidates"])
        for r in runs.values():
            x = [ref["first_round_candidates"][k] for k in keys]
            y = [r["first_round_candidates"][k] for k in keys]
            r["vs_float32"] = {
                "spearman_first_round": spearman(x, y),
                "max_rel_ppl_gap_first_round": max(abs(p - q) / p for p, q in zip(x, y) if math.isfinite(p)),
                "same_removals": r["removed"] == ref["removed"],
                "speedup": ref["wall_s"] / r["wall_s"],
            }
    out = {
        "model": a.model, "calibration": f"c4 {a.nsamples}x{a.seqlen}", "rounds": a.rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()),
        "runs": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in runs.items():
        if "vs_float32" in r:
            print(name, json.dumps(r["vs_float32"]))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
