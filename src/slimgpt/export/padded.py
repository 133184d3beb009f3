"""Padded export: a stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Gemma3ForCausalLM`` folder
with the original shapes, removed heads and channels filled back in as zeros.

Any engine that serves the original architecture (transformers without custom code, vLLM, TGI,
llama.cpp's ``convert_hf_to_gguf.py``) then runs the pruned model: same outputs, but none of the
speed or memory gain, since the zeros are multiplied like any weight. Use it to serve where the
slim format and the ``deci`` GGUF cannot go (vLLM reads one head count per model).

Why zeros reproduce the pruned model exactly: a padded query head has zero q rows and zero o_proj
columns, so whatever it attends to, it adds nothing; a padded key/value head is read only by
padded query heads; a padded channel has zero gate/up rows (and biases) and zero down columns, and
``act(0) * 0 = 0``. (Gemma 3's norms act on the block outputs or per head over ``head_dim``, so
they see the same values.) The original geometry comes from the slim config's stock fields
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``), which keep the
unpruned model's values (:mod:`slimgpt.modeling.configuration_slimgpt`).

Kept heads are packed into the first slots of the first key/value groups: pruning did not record
*which* original slots survived, and it does not matter, because the stock attention maps query
head ``j`` to key/value head ``j // n_rep``; placing pruned query head ``j`` (group ``g = j // r``,
``r`` kept per group) at slot ``g * n_rep + j % r`` keeps every query head on its own key/value head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from slimgpt.errors import ModelError
from slimgpt.modeling.configuration_slimgpt import LAYER_FIELDS

STOCK = {
    "slimgpt_llama": (LlamaConfig, LlamaForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "slimgpt_qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "slimgpt_gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def stock_config(model: PreTrainedModel) -> Any:
    """The unpruned model's stock config: the slim config minus its per-layer lists and auto_map."""
    model_type = model.config.model_type
    if model_type not in STOCK:
        raise ModelError(f"padded export supports Llama, Qwen2 and Gemma 3 models, not '{model_type}'")
    if getattr(model.config, "o_proj_bias", False) or getattr(model.config, "down_proj_bias", False):
        # FLAP's bias compensation adds o_proj/down_proj biases that the stock architectures cannot hold
        raise ModelError("this model has o_proj/down_proj biases (FLAP) that a stock architecture cannot hold; "
                         "use --to gguf or the slim folder")
    config_cls, model_cls = STOCK[model_type]
    fields = model.config.to_dict()
    # per_layer_config mirrors the slim sizes (configuration_slimgpt): the padded layers are all full-size
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", *LAYER_FIELDS,
                "per_layer_config", "allow_global_per_layer_attribute_access"):
        fields.pop(key, None)
    if (fields.get("quantization_config") or {}).get("quant_method") == "gguf":
        # zoo models were dequantised from GGUF: the weights are plain floats, and a stale
        # "quant_method: gguf" makes other tools (llama.cpp's converter, vLLM) refuse the folder
        fields.pop("quantization_config")
    config = config_cls(**fields, architectures=[model_cls.__name__])
    config._attn_implementation = model.config._attn_implementation
    return config


def _pad_rows(w: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    out = w.new_zeros((total, *w.shape[1:]))
    out[rows] = w
    return out


def _pad_cols(w: torch.Tensor, cols: torch.Tensor, total: int) -> torch.Tensor:
    out = w.new_zeros((w.shape[0], total))
    out[:, cols] = w
    return out


def _head_slots(heads: int, kv_heads: int, full_heads: int, full_kv: int, layer: int) -> tuple[list[int], list[int]]:
    """Original query-head and key/value-head slots of the pruned layer's heads, in order."""
    if heads == 0:
        return [], []
    rep, full_rep = heads // kv_heads, full_heads // full_kv
    if heads > full_heads or kv_heads > full_kv or rep > full_rep:
        raise ModelError(f"layer {layer}: {heads} query / {kv_heads} key-value heads do not fit the original "
                         f"{full_heads} / {full_kv}; the config's stock fields must describe the unpruned model")
    return [(j // rep) * full_rep + j % rep for j in range(heads)], list(range(kv_heads))


def _rows(slots: list[int], head_dim: int) -> torch.Tensor:
    idx = torch.tensor(slots, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@torch.no_grad()
def to_padded(model: PreTrainedModel) -> PreTrainedModel:
    """A new stock model (same dtype/device) computing what ``model`` computes; ``model`` is not
    changed (weights are copied into zero-filled full-size tensors)."""
    from slimgpt.arch import get_adapter

    config = stock_config(model)
    _, model_cls = STOCK[model.config.model_type]
    with torch.device("meta"):
        padded = model_cls(config)
    src = get_adapter(model)
    state: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    d = config.head_dim
    full_h, full_kv, full_ff = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size

    def put(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        state[names[id(lin)] + ".weight"] = weight
        if lin.bias is not None:
            state[names[id(lin)] + ".bias"] = bias

    for i, layer in enumerate(src.layers):
        g = src.geometry(layer)
        if g.head_dim != d:
            raise ModelError(f"layer {i}: head_dim {g.head_dim} differs from the config's {d}")
        a = src.attention(layer)
        q_slots, kv_slots = _head_slots(g.num_heads, g.num_kv_heads, full_h, full_kv, i)
        qr, kvr = _rows(q_slots, d), _rows(kv_slots, d)
        for lin, rows, total in ((a.q, qr, full_h * d), (a.k, kvr, full_kv * d), (a.v, kvr, full_kv * d)):
            bias = _pad_rows(lin.bias, rows, total) if lin.bias is not None else None
            put(lin, _pad_rows(lin.weight, rows, total), bias)
        put(a.o, _pad_cols(a.o.weight, qr, full_h * d), a.o.bias.clone() if a.o.bias is not None else None)
        m = src.mlp(layer)
        c = src.intermediate_size(layer)
        if c > full_ff:
            raise ModelError(f"layer {i}: {c} FFN channels exceed the original {full_ff}")
        ch = torch.arange(c)
        for lin in (m.gate, m.up):
            put(lin, _pad_rows(lin.weight, ch, full_ff), _pad_rows(lin.bias, ch, full_ff) if lin.bias is not None else None)
        put(m.down, _pad_cols(m.down.weight, ch, full_ff), m.down.bias.clone() if m.down.bias is not None else None)
    for name, tensor in model.state_dict().items():
        state.setdefault(name, tensor.clone())
    missing, unexpected = padded.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"padded export bug: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        padded.tie_weights()
    source_buffers = dict(model.named_buffers())
    for name, buf in list(padded.named_buffers()):  # rotary inv_freq, Gemma's embed_scale (not in the state dict)
        if buf.device.type == "meta":
            owner, _, key = name.rpartition(".")
            padded.get_submodule(owner)._buffers[key] = source_buffers[name].clone()
    left = [n for n, t in [*padded.named_parameters(), *padded.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"padded export bug: tensors left on the meta device: {left[:5]}")
    padded.generation_config = model.generation_config
    return padded.eval()


def export_padded(model: PreTrainedModel, tokenizer: Any, out: str | Path, overwrite: bool = False) -> Path:
    """Write the padded model (plus tokenizer and a ``slimgpt_padded.json`` note) to folder ``out``."""
    from slimgpt.io import atomic_path

    padded = to_padded(model)
    with atomic_path(out, overwrite) as tmp:
        padded.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        note = {"padded_from": getattr(model.config, "_name_or_path", None),
                "layer_sizes": {k: getattr(model.config, k, None) for k in LAYER_FIELDS},
                "note": "removed heads/channels are zero-filled; same outputs as the pruned model, no speed-up"}
        (tmp / "slimgpt_padded.json").write_text(json.dumps(note, indent=2) + "\n")
    return Path(out).expanduser().resolve()
