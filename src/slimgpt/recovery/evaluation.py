"""Held-out scoring of a recovery run: the student's NLL / perplexity and its KL to the teacher."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from slimgpt.recovery.data import Example, collate
from slimgpt.recovery.losses import IGNORE, TeacherTargets, chunked_head_loss
from slimgpt.recovery.split import hidden_states, scored_rows, split_model
from slimgpt.recovery.teacher import Teacher


@torch.no_grad()
def evaluate(model: nn.Module, val: list[Example], pad_id: int, device: torch.device, batch_size: int = 8,
             teacher: Teacher | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
             chunk: int = 256) -> dict[str, float]:
    """Held-out token-weighted NLL, perplexity and (with a teacher) KL(teacher ‖ student) at T = 1,
    the distributions the model is used with (model in eval mode: no LoRA dropout)."""
    was_training = model.training
    model.eval()
    split = split_model(model)
    kl = nll = 0.0
    count = 0
    try:
        for start in range(0, len(val), batch_size):
            batch = collate(val[start:start + batch_size], pad_id)
            targets = None
            if teacher is not None:
                targets = TeacherTargets(hidden=teacher._rows(batch, device), head=teacher._head)
            with autocast():
                rows = scored_rows(hidden_states(split, batch, device), batch["labels"])
                labels = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE].to(device)
                parts = chunked_head_loss(rows, split.weight.detach(), labels, split.head, teacher=targets,
                                          temperature=1.0, lm_weight=1.0, chunk=chunk)
            kl += parts.kl_sum
            nll += parts.nll_sum
            count += parts.tokens
    finally:
        model.train(was_training)
    mean = nll / max(count, 1)
    out = {"eval_nll": mean, "eval_loss": mean, "eval_ppl": math.exp(mean) if mean < 700 else math.inf,
           "eval_tokens": count}
    if teacher is not None:
        out["eval_kl"] = kl / max(count, 1)
    return out


__all__ = ["evaluate"]
