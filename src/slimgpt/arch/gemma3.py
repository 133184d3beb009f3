"""Gemma 3 (text): ``Gemma3ForCausalLM``, model_type ``gemma3_text``.

Differences from the Llama layout that the block-by-block forward must reproduce:

- **Sandwich norms.** A layer is ``h + post_attention_layernorm(attn(input_layernorm(h)))`` then
  ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``. A removed block still adds
  exactly zero, because RMSNorm of a zero vector is zero (``0 * rsqrt(0 + eps)``); BlockPruner's
  zeroed o_proj/down_proj therefore still give the skip model.
- **Per-head q_norm / k_norm** (over ``head_dim``, shared by all heads): pruning heads leaves them
  alone and they are not counted per head.
- **Sliding-window and full layers** (``config.layer_types``) with *different* rotary bases; the
  context holds rotary embeddings and a mask per layer type (the sliding mask lets query ``q``
  see keys ``q - sliding_window < k <= q``, as transformers' ``sliding_window_overlay``).
- Scaled embeddings (the stock ``Gemma3TextScaledWordEmbedding`` multiplies by ``sqrt(hidden)``),
  ``query_pre_attn_scalar`` (inside the stock attention) and ``final_logit_softcapping``.

Hessians are collected on the inputs of o_proj and down_proj, which the post-norms do not touch,
so OBS compensation reconstructs o_proj's / down_proj's own output (before the post-norm): the
usual layer-wise objective, one nonlinearity earlier than the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from slimgpt.arch.base import LayerContext, ModelAdapter, register
from slimgpt.errors import ModelError


@register
class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text", "slimgpt_gemma3")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise ModelError("this Gemma 3 model attends bidirectionally (an embedding model, not a causal LM); "
                             "only causal Gemma 3 text models can be pruned")

    def attention_block_modules(self, layer: nn.Module) -> tuple[nn.Module, ...]:
        return layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm

    def context(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> LayerContext:
        """Rotary embeddings and explicit additive masks per layer type: causal for full layers,
        causal within ``sliding_window`` for sliding ones (calibration windows have no padding)."""
        rotary = self.decoder.rotary_emb.to(device)
        pos = torch.arange(seqlen, device=device)
        dummy = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
        dist = pos[:, None] - pos[None, :]  # query minus key position
        by_type = {}
        for kind in sorted(set(self.config.layer_types)):
            visible = dist >= 0
            if kind == "sliding_attention":
                visible &= dist < self.config.sliding_window
            mask = torch.zeros(seqlen, seqlen, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
            by_type[kind] = {"position_embeddings": rotary(dummy, pos[None], kind), "attention_mask": mask[None, None]}
        return LayerContext(by_type.get("full_attention", next(iter(by_type.values()))), by_type)

    def attention_block(self, layer: nn.Module, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """``hidden + post_norm(attn(norm(hidden)))`` with the layer type's rotary and mask."""
        kwargs = ctx.by_type[layer.self_attn.layer_type]
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]
        return hidden + layer.post_attention_layernorm(out)

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + post_norm(mlp(pre_norm(hidden)))``."""
        return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))

    def mlp_hidden(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        m = layer.mlp
        x = layer.pre_feedforward_layernorm(hidden)
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.decoder.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
