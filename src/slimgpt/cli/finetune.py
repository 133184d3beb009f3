"""``slimgpt finetune``: LoRA recovery fine-tuning of a pruned model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimgpt.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder (or any zoo name / model folder)")
    p.add_argument("--data", required=True,
                   help="Alpaca .json/.jsonl (prompt masked), text file, c4 | wiki | wikitext2, or hub org/name[:config:split]")
    p.add_argument("--out", help="output folder: the adapter, or with --merge a model folder like the pruned one")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new folder is complete")
    p.add_argument("--merge", action="store_true", help="fold the adapters into the weights and save a plain model")
    p.add_argument("--eval-data", help="held-out text/records for the evaluation loss (default: split of --data)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimiser steps (0: before and after)")
    p.add_argument("--val-size", type=int, help="held-out examples split off --data (default min(128, 10%%))")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (paper: 1)")
    p.add_argument("--max-steps", type=int, help="stop after N optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward pass (micro-batch)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default: 64 / --batch-size, the paper's batch)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per example (paper: 256)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, cosine-annealed (paper: 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (LLM-Pruner: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (LLM-Pruner: 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (LLM-Pruner: 0.05)")
    p.add_argument("--max-train-samples", type=int, help="use at most N training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ and calibration/ (default $SLIMGPT_DATA)")
    p.add_argument("--json", help="write the run report (losses per step) here as JSON")


def run(a: argparse.Namespace) -> int:
    """LoRA recovery fine-tuning of a pruned model (paper: Alpaca, 1 epoch, lr 1e-4, batch 64, length 256)."""
    from slimgpt.finetune import FinetuneConfig, finetune

    if a.out is None and a.json is None:
        raise ConfigError("--out is required (the adapter or merged model folder), unless --json only is wanted")
    cfg = FinetuneConfig(
        model=a.model, data=a.data, out=a.out, eval_data=a.eval_data, epochs=a.epochs, max_steps=a.max_steps,
        batch_size=a.batch_size, grad_accum=a.grad_accum, seqlen=a.seqlen, lr=a.lr, warmup_steps=a.warmup_steps,
        rank=a.rank, alpha=a.alpha, dropout=a.dropout, max_train_samples=a.max_train_samples,
        val_size=a.val_size, eval_every=a.eval_every, merge=a.merge, seed=a.seed, device=a.device,
        data_dir=a.data_dir, overwrite=a.overwrite,
    )
    res = finetune(cfg)
    info = res.report["finetune"]
    print(f"trained {info['config']['max_steps'] or len([h for h in res.history if 'loss' in h])} steps "
          f"(effective batch {info['config']['effective_batch']}) in {info['time_s']:.0f} s; "
          f"train loss {info['first_loss']:.4f} → {info['last_loss']:.4f}")
    if info["eval_loss"]:
        first, last = info["eval_loss"][0], info["eval_loss"][-1]
        print(f"held-out loss: step {first['step']} {first['eval_loss']:.4f} → step {last['step']} {last['eval_loss']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps({**res.report, "history": res.history}, indent=2, default=str))
    if res.out is not None:
        what = "merged model" if a.merge else "LoRA adapter"
        print(f"saved {what} to {res.out}")
    return 0
