"""LoRA adapters on a pruned model: where they go, how they are added, merged and reloaded.

Pruned layers have their own shapes and a removed block keeps zero-sized linears
(:mod:`slimgpt.modeling`): LoRA targets exactly the linears with weights, by full module name, so
a layer with 0 heads or 0 channels gets no adapter there (an adapter on an empty matrix would
either crash or add parameters that do nothing). LLM-Pruner's settings are the defaults: rank 8,
alpha 16, dropout 0.05 on q, k, v, o, gate, up, down.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt.errors import ConfigError, ModelError


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads ``model.is_gradient_checkpointing`` when it wraps or loads a model, a property
    transformers 5 deprecated (a ``FutureWarning`` on every fine-tune); its replacement
    ``is_activation_checkpointing`` gives the same answer, so only that one warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the q, k, v, o, gate, up, down linears of every decoder layer that still have
    weights (removed heads/channels leave zero-sized linears, which get no adapter)."""
    from slimgpt.arch import get_adapter

    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    for layer in adapter.layers:
        a, m = adapter.attention(layer), adapter.mlp(layer)
        for lin in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
            if lin.weight.numel() > 0:
                targets.append(names[id(lin)])
    if not targets:
        raise ModelError("the model has no linear projection left to adapt (every block removed)")
    return targets


def add_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on :func:`lora_targets` (base weights frozen);
    ``cfg`` gives ``rank``, ``alpha``, ``dropout``."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'slimgpt[finetune]' (peft==0.21.2)") from None
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
    with quiet_peft():
        return peft.get_peft_model(model, config)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the weights (``W + B A · alpha/r``) and drop every peft wrapper:
    the result is the plain base model class."""
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def load_adapter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` from an adapter folder written by ``slimgpt finetune`` without
    ``--merge``: the base (pruned) model is the one recorded in ``adapter_config.json``."""
    folder = Path(path).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"{folder} has no adapter_config.json; give a folder written by slimgpt finetune")
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("loading a LoRA adapter needs peft: pip install 'slimgpt[finetune]'") from None
    from slimgpt.zoo import load_model

    base_path = json.loads(config.read_text()).get("base_model_name_or_path")
    base, tokenizer = load_model(base_path, device=device)
    with quiet_peft():
        return PeftModel.from_pretrained(base, folder).eval(), tokenizer


__all__ = ["add_lora", "is_peft", "load_adapter", "lora_targets", "merge_lora", "quiet_peft"]
