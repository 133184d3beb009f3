"""Recovery fine-tuning of a pruned model (the library side of ``slimgpt finetune``).

The work lives in :mod:`slimgpt.recovery` (data packing, losses, the training loop, checkpoints);
this module keeps the names the LoRA recovery path has always had. Without a teacher the recipe
is the paper's (§4, as LLM-Pruner): LoRA (rank 8, alpha 16, dropout 0.05 on q, k, v, o, gate, up,
down) on the language-model loss, AdamW with cosine annealing, prompt tokens of Alpaca examples
masked out of the loss; ``--teacher`` switches to distillation (:mod:`slimgpt.recovery.losses`).

Why a plain PyTorch loop instead of ``transformers.Trainer``: the loop weights the loss by *tokens
over the whole effective batch* (gradient accumulation over variable-length Alpaca examples would
otherwise weight short examples more), runs a teacher beside the student with a chunked head loss,
resumes exactly, and evaluates held-out text at fixed optimiser steps, with no accelerate/datasets
plumbing to configure on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt.recovery.api import RecoveryResult as FinetuneResult
from slimgpt.recovery.api import recover as finetune
from slimgpt.recovery.api import save_recovered as save_finetuned
from slimgpt.recovery.config import RecoveryConfig as FinetuneConfig
from slimgpt.recovery.data import Example, TrainData, alpaca_examples, build_examples, collate, text_examples
from slimgpt.recovery.evaluation import evaluate
from slimgpt.recovery.loop import Trainer
from slimgpt.recovery.lora import add_lora, load_adapter, lora_targets, merge_lora
from slimgpt.recovery.losses import IGNORE
from slimgpt.recovery.plan import resolve_plan


def summed_nll(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum over scored positions of -log p(label), from the model's own logits (a reference for the
    chunked loss the loop uses)."""
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def evaluate_loss(model: nn.Module, examples: list[Example], pad_id: int, device: torch.device,
                  batch_size: int = 8) -> float:
    """Token-weighted mean NLL over ``examples`` (model in eval mode: no LoRA dropout)."""
    return evaluate(model, examples, pad_id, device, batch_size)["eval_nll"]


def train_lora(model: nn.Module, train: list[Example], val: list[Example], cfg: FinetuneConfig, pad_id: int,
               device: torch.device, progress: bool = True) -> list[dict[str, Any]]:
    """Train the trainable (LoRA) parameters of ``model`` in place on the LM loss; returns the
    per-step history (``step``, ``loss``, ``lr``, ``tokens``, and ``eval_loss`` at evaluation steps;
    step 0 is the evaluation before training)."""
    data = TrainData(list(train), [(0, len(train))], [None], list(val))
    window_tokens = sum(len(e.input_ids) for e in train) / max(len(train), 1)
    vocab = model.get_output_embeddings().weight.shape[0]
    plan = resolve_plan(cfg, device, len(train), window_tokens, vocab)
    return Trainer(model, cfg, plan, data, pad_id, device, progress=progress).run()


__all__ = ["IGNORE", "Example", "FinetuneConfig", "FinetuneResult", "add_lora", "alpaca_examples", "build_examples",
           "collate", "evaluate_loss", "finetune", "load_adapter", "lora_targets", "merge_lora", "save_finetuned",
           "summed_nll", "text_examples", "train_lora"]
