"""``slimgpt finetune``: recovery of a pruned model by distillation from its dense teacher or by LoRA."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimgpt.errors import ConfigError

_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def token_count(text: str) -> int:
    """``200000``, ``200k``, ``20M``, ``1.5B`` → tokens."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _SUFFIXES[t[-1]] if t and t[-1] in _SUFFIXES else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: '{text}' (write 200000, 200k or 20M)") from None
    return int(value)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder (or any zoo name / model folder)")
    p.add_argument("--data", default="c4",
                   help="comma-separated sources, each optionally source@weight: c4 | wiki | wikitext2 | tiny | code | "
                        "technical | multilingual | teacher (text sampled from the teacher) | a text/.jsonl file | "
                        "Alpaca .json (prompt masked) | hub org/name[:config:split] (default: c4)")
    p.add_argument("--out", help="output folder: a model folder like the pruned one (LoRA without --merge: the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new folder is complete")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint (OUT.recovery/)")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", metavar="auto|MODEL",
                   help="distil from this model: auto = the source model recorded in the pruned folder's slimgpt.json "
                        "(default: no teacher, LM loss)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL (loss scaled by T²)")
    g.add_argument("--lm-weight", type=float, default=0.0, help="loss = (1-w)·KL + w·LM, w in [0, 1] (default: 0, KL only)")
    g.add_argument("--teacher-topk", type=int, metavar="K",
                   help="keep the teacher's K most likely tokens per position (cached for windows read again)")
    g.add_argument("--teacher-tokens", type=token_count, metavar="N",
                   help="--data teacher: sample at most N tokens (default: the teacher's share of the run, each once)")
    g = p.add_argument_group("what trains")
    g.add_argument("--lora", action="store_true", help="LoRA adapters (the default without --teacher)")
    g.add_argument("--full", action="store_true", help="every weight (the default with --teacher); not with --lora")
    g.add_argument("--merge", action="store_true", help="LoRA: fold the adapters into the weights and save the model")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (LLM-Pruner: 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (LLM-Pruner: 16)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (LLM-Pruner: 0.05)")
    g = p.add_argument_group("budget and optimiser")
    g.add_argument("--max-tokens", type=token_count, metavar="N",
                   help="train on N tokens (200k, 20M); the steps follow from the global batch")
    g.add_argument("--max-steps", type=int, help="stop after N optimiser steps (overrides --max-tokens and --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the real data when no budget is given")
    g.add_argument("--batch-size", type=int, help="windows per forward pass (default: 4 on CPU, 16 on GPU)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (default: 1 on CPU, 4 on GPU)")
    g.add_argument("--seqlen", type=int, default=256, help="tokens per window; documents are packed (paper: 256)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (default: 3e-4 full-parameter, 2e-3 LoRA)")
    g.add_argument("--warmup", "--warmup-steps", type=float, default=0.05,
                   help="linear warm-up before the cosine decay: a share of the steps (< 1) or a step count")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (bf16 autocast on GPUs and on CPUs with AMX/AVX512-BF16, else float32) | "
                        "float32 | bfloat16; weights and optimiser stay float32")
    g.add_argument("--max-train-samples", type=int, help="use at most N training windows per source")
    g = p.add_argument_group("evaluation, checkpoints, devices")
    g.add_argument("--eval-data", help="held-out text/records (default: --val-size windows split off the first source)")
    g.add_argument("--val-size", type=int, help="held-out windows (default: 16 on CPU, 128 on GPU, at most 10%%)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="score the held-out windows (KL, perplexity) every N steps (0: up to ten times per run, at most ~10%% of its time; always before and after)")
    g.add_argument("--save-every", default="10m",
                   help="checkpoint every N steps or every 600s / 10m / 1h of training (0: never); Ctrl-C also saves")
    g.add_argument("--seed", type=int, default=0, help="data order, LoRA init, teacher samples (default: 0)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--data-dir", help="folder with wikitext-2-raw/ and calibration/ (default $SLIMGPT_DATA)")
    g.add_argument("--json", help="write the run report (config, speed, losses per step) here as JSON")


def train_loss(means: dict) -> str:
    """The training loss as running means: a single step's loss is one global batch's, too noisy to
    compare the first with the last (a run whose held-out perplexity fell printed 0.57 → 1.45)."""
    if means.get("run") is None:
        return "no training steps"
    n = means["window_steps"]
    return (f"train loss {means['first']:.4f} (mean of the first {n} steps) → {means['last']:.4f} (last {n}), "
            f"{means['run']:.4f} over the run")


def run(a: argparse.Namespace) -> int:
    """Recover a pruned model: distillation from its dense teacher (--teacher auto) or LoRA on the LM loss."""
    from slimgpt import distributed
    from slimgpt.recovery import RecoveryConfig, recover

    if a.lora and a.full:
        raise ConfigError("--lora and --full choose opposite ways to train; give one (default: --full with --teacher, "
                          "--lora without)")
    if a.out is None and a.json is None:
        raise ConfigError("--out is required (the recovered model or adapter folder), unless --json only is wanted")
    cfg = RecoveryConfig(
        model=a.model, data=a.data, out=a.out, teacher=a.teacher, temperature=a.temperature, lm_weight=a.lm_weight,
        teacher_topk=a.teacher_topk, teacher_tokens=a.teacher_tokens, lora=True if a.lora else False if a.full else None,
        merge=a.merge,
        max_tokens=a.max_tokens, max_steps=a.max_steps, epochs=a.epochs, batch_size=a.batch_size,
        grad_accum=a.grad_accum, seqlen=a.seqlen, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
        grad_checkpointing=a.grad_checkpointing, dtype=a.dtype, max_train_samples=a.max_train_samples,
        val_size=a.val_size, eval_data=a.eval_data, eval_every=a.eval_every, save_every=a.save_every,
        resume=a.resume, seed=a.seed, device=a.device, data_dir=a.data_dir, overwrite=a.overwrite,
    )
    res = recover(cfg)
    if not distributed.is_main():
        return 0
    info = res.report["finetune"]
    speed = info["speed"]
    rate = f", {speed['train_tok_s']:.0f} tokens/s" if speed.get("train_tok_s") else ""
    if speed.get("forward_tok_s"):
        rate += f" (forward only: {speed['forward_tok_s']:.0f})"
    print(f"trained {info['steps']} steps (effective batch {info['config']['effective_batch']}, "
          f"{info['tokens']:,} tokens) in {info['train_s']:.0f} s{rate}; "
          f"{train_loss(info['loss_means'])}")
    if info["evals"]:
        first, last = info["evals"][0], info["evals"][-1]
        kl = f", KL {first['eval_kl']:.4f} → {last['eval_kl']:.4f}" if "eval_kl" in first else ""
        print(f"held-out loss: step {first['step']} {first['eval_nll']:.4f} → step {last['step']} {last['eval_nll']:.4f} "
              f"(perplexity {first['eval_ppl']:.2f} → {last['eval_ppl']:.2f}{kl})")
    if a.json:
        Path(a.json).write_text(json.dumps({**res.report, "history": res.history}, indent=2, default=str))
    if res.out is not None:
        lora = info["plan"]["lora"]
        what = "merged model" if lora and a.merge else "LoRA adapter" if lora else "model"
        print(f"saved {what} to {res.out}")
    return 0
