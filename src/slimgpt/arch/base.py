"""The adapter protocol: where an architecture keeps its attention and MLP pieces.

Pruning code never touches ``model.model.layers[i].self_attn.o_proj`` directly; it asks the
adapter. A new architecture is one subclass of :class:`ModelAdapter` in its own file, registered
in :data:`ADAPTERS` by its ``config.model_type``.

The adapter also runs a decoder layer as two residual *blocks* (attention, MLP). The layer-wise
driver needs those block boundaries: SlimGPT collects the o_proj Hessian in the attention block
and the down_proj Hessian in the MLP block, and BlockPruner removes blocks one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class HeadGeometry:
    """Attention shape of one layer. Query head ``i`` reads key/value head ``i // n_rep``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass
class AttentionLinears:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class MlpLinears:
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass
class LayerContext:
    """What a decoder layer needs besides hidden states, shared by all calibration batches
    of one sequence length: rotary embeddings and the causal mask.

    Models whose layers differ in attention kind (Gemma 3: sliding-window layers with a local
    rotary base, full layers with a global one) also fill ``by_type``, one set of keyword
    arguments per ``config.layer_types`` entry; their adapter picks the layer's own.
    """

    attn_kwargs: dict[str, Any]
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)


class ModelAdapter:
    """Default implementation for pre-norm decoders laid out like Llama:
    ``layer.input_layernorm → layer.self_attn(q,k,v,o) → residual →
    layer.post_attention_layernorm → layer.mlp(gate,up,down) → residual``."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- where things live -------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, layer: nn.Module) -> AttentionLinears:
        a = layer.self_attn
        return AttentionLinears(a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def mlp(self, layer: nn.Module) -> MlpLinears:
        m = layer.mlp
        return MlpLinears(m.gate_proj, m.up_proj, m.down_proj)

    def geometry(self, layer: nn.Module) -> HeadGeometry:
        """Read the geometry off the weights, so it is right for pruned layers too."""
        head_dim = layer.self_attn.head_dim
        lin = self.attention(layer)
        return HeadGeometry(lin.q.out_features // head_dim, lin.k.out_features // head_dim, head_dim)

    def intermediate_size(self, layer: nn.Module) -> int:
        return self.mlp(layer).down.in_features

    def sync_attention(self, layer: nn.Module) -> None:
        """Make the attention module's head bookkeeping agree with its (cut or restored) weights,
        so the layer runs at its new shape: the stock forward reads ``num_key_value_groups`` to
        repeat key/value heads (the slim modules also keep ``num_heads`` / ``num_key_value_heads``).
        :mod:`slimgpt.surgery` calls it after every cut; an architecture with other attributes
        overrides it."""
        g, attn = self.geometry(layer), layer.self_attn
        for name, value in (("num_key_value_groups", g.n_rep), ("num_heads", g.num_heads),
                            ("num_key_value_heads", g.num_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def attention_block_modules(self, layer: nn.Module) -> tuple[nn.Module, ...]:
        """Every module whose weights :meth:`attention_block` reads (its outputs are cached
        for as long as none of them changes)."""
        return layer.self_attn, layer.input_layernorm

    # ---- running the model block by block ------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def context(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> LayerContext:
        """Rotary embeddings for positions ``0..seqlen-1`` and an explicit additive causal mask
        (explicit so that eager and SDPA attention agree; calibration windows have no padding)."""
        rotary = self.decoder.rotary_emb.to(device)
        pos = torch.arange(seqlen, device=device).unsqueeze(0)
        dummy = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
        cos, sin = rotary(dummy, pos)
        mask = torch.full((seqlen, seqlen), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)
        return LayerContext({"position_embeddings": (cos, sin), "attention_mask": mask[None, None]})

    def attention_block(self, layer: nn.Module, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """``hidden + attn(norm(hidden))``."""
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **ctx.attn_kwargs)[0]
        return hidden + out

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + mlp(norm(hidden))``."""
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def mlp_hidden(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The input of down_proj (``act(gate(x)) * up(x)``), for activation statistics."""
        m = layer.mlp
        x = layer.post_attention_layernorm(hidden)
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.decoder.norm(hidden))

    # ---- parameter accounting --------------------------------------------------------------
    def attention_params_per_head(self, layer: nn.Module) -> tuple[int, int]:
        """(parameters per query head: q rows + o columns, per key/value head: k and v rows)."""
        lin = self.attention(layer)
        d = self.geometry(layer).head_dim
        per_q = d * lin.q.in_features + d * lin.o.out_features + (d if lin.q.bias is not None else 0)
        per_kv = 2 * d * lin.k.in_features + (2 * d if lin.k.bias is not None else 0)
        return per_q, per_kv

    def mlp_params_per_channel(self, layer: nn.Module) -> int:
        lin = self.mlp(layer)
        n = lin.gate.in_features * 2 + lin.down.out_features
        return n + sum(1 for x in (lin.gate.bias, lin.up.bias) if x is not None)


ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for t in cls.model_types:
        ADAPTERS[t] = cls
    return cls
