"""Recovery figure: WikiText-2 perplexity of a pruned model before and after LoRA fine-tuning.

One command, one JSON file. Prunes first if the pruned folder does not exist yet:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/recovery.py --pruned /tmp/p50 --ratio 0.5 \\
        --data ../shared/data/calibration/c4.utf8 --max-steps 24 --batch-size 8 --seqlen 128 \\
        --lr 1e-3 --data-dir ../shared/data --json recovery.json

(On a busy 2-core machine a single thread is much faster than two: OpenMP workers spin while
they wait for each other.) The paper's recipe is 1 epoch of Alpaca at batch 64 / length 256 /
lr 1e-4; the CPU defaults here are a few minutes of C4 text, so the recovery is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="dense model to prune when --pruned is missing")
    p.add_argument("--pruned", required=True, help="pruned folder (created with slimgpt prune if missing)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--data", default="c4", help="fine-tuning data (default: the c4 calibration text)")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--data-dir")
    p.add_argument("--save", help="also save the merged model here")
    p.add_argument("--json", default="recovery.json")
    a = p.parse_args()

    from slimgpt.api import prune
    from slimgpt.config import PruneConfig
    from slimgpt.evaluation.perplexity import perplexity
    from slimgpt.finetune import FinetuneConfig, finetune
    from slimgpt.zoo import load_model

    def ppl(model, tok) -> float:
        return perplexity(model, tok, "wikitext2", seqlen=128, max_windows=a.max_windows, data_dir=a.data_dir)["ppl"]

    result: dict = {"threads": torch.get_num_threads()}
    if not Path(a.pruned).exists():
        t0 = time.perf_counter()
        prune(PruneConfig(model=a.model, out=a.pruned, ratio=a.ratio, nsamples=a.nsamples, seqlen=a.calib_seqlen,
                          data_dir=a.data_dir))
        result["prune_s"] = time.perf_counter() - t0
    dense, tok = load_model(a.model)
    result["dense_ppl"] = ppl(dense, tok)
    del dense
    model, tok = load_model(a.pruned)
    result["pruned_ppl"] = ppl(model, tok)
    cfg = FinetuneConfig(model=a.pruned, data=a.data, out=a.save, merge=True, max_steps=a.max_steps,
                         batch_size=a.batch_size, grad_accum=a.grad_accum, seqlen=a.seqlen, lr=a.lr, val_size=0,
                         data_dir=a.data_dir, overwrite=True)
    res = finetune(cfg, model=model, tokenizer=tok)
    result["finetuned_ppl"] = ppl(res.model, tok)
    result["finetune"] = res.report["finetune"]
    result["history"] = res.history
    result["protocol"] = f"WikiText-2 test, seq 128, first {a.max_windows} windows"
    Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    print(f"dense {result['dense_ppl']:.2f} | pruned {result['pruned_ppl']:.2f} | "
          f"pruned + LoRA ({a.max_steps} steps) {result['finetuned_ppl']:.2f}  → {a.json}")


if __name__ == "__main__":
    main()
