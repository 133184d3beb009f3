"""A causal LM seen as decoder + head, so the loss can apply the head a chunk of rows at a time
(:mod:`slimgpt.recovery.losses`) instead of materialising the logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimgpt.errors import ConfigError
from slimgpt.recovery.lora import is_peft
from slimgpt.recovery.losses import IGNORE, linear_head


@dataclass
class Split:
    """A causal LM seen as decoder (hidden states) + head (weight and logit function)."""

    body: nn.Module
    weight: torch.Tensor
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_model(model: nn.Module) -> Split:
    base = model.get_base_model() if is_peft(model) else model  # type: ignore[operator]
    head = base.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ConfigError(f"{type(base).__name__} has no bias-free LM head; recovery supports Llama, Qwen2, Gemma 3")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return Split(base.get_decoder(), head.weight, linear_head(softcap))


def hidden_states(split: Split, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Final (normed) hidden states of a batch; the padding mask is passed only when there is padding
    (an all-ones mask would keep SDPA off its causal fast path)."""
    mask = batch["attention_mask"]
    out = split.body(input_ids=batch["input_ids"].to(device),
                     attention_mask=None if bool(mask.all()) else mask.to(device), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def scored_rows(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden[:, :-1]`` whose next-token label is scored, in row-major order."""
    sel = (labels[:, 1:] != IGNORE).to(hidden.device)
    return hidden[:, :-1][sel]


__all__ = ["Split", "hidden_states", "scored_rows", "split_model"]
