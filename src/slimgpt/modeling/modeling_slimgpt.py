"""Llama / Qwen2 / Gemma 3 (text) whose decoder layers each have their own head and channel counts.

Only constructors differ from the stock classes: every layer ``i`` is built with
``config.layer_num_attention_heads[i]`` query heads, ``layer_num_key_value_heads[i]`` key/value
heads and ``layer_intermediate_size[i]`` FFN channels (see ``configuration_slimgpt.py``); all
forward code is the stock code, so attention backends, ``generate()``, peft and exporters behave as
for the original model. Query head ``j`` of a layer reads key/value head ``j // num_key_value_groups``
with the layer's own ``num_key_value_groups``.

Removed blocks keep zero-sized linears (so checkpoints and parameter names stay regular):

- 0 channels: the stock MLP already returns exactly zero (``down_proj`` sums over nothing).
- 0 heads: the attention returns ``o_proj`` of an empty input (zero, or ``o_proj.bias``) and still
  writes a ``(batch, 1, seq, 1)`` zero placeholder into the KV cache: the cache reads the sequence
  length from layer 0 (and counts a tensor without elements as length 0), and a hybrid cache
  (Gemma 3) reads mask sizes from the first sliding and the first full layer, so without it positions
  and masks go wrong during incremental decoding. It costs one number per token and layer.
- Gemma 3 adds a norm on each block's output before the residual add; RMSNorm of zero is zero, so
  removed blocks still add nothing there.

This file is copied beside every saved model for ``trust_remote_code=True``: it may import only
torch, transformers and its sibling ``configuration_slimgpt``.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3Attention,
    Gemma3DecoderLayer,
    Gemma3MLP,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from .configuration_slimgpt import SlimGemma3Config, SlimLlamaConfig, SlimQwen2Config

# ---- shared constructors ------------------------------------------------------------------------


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """``nn.Linear`` that stays quiet about initialising the zero-sized weights of removed blocks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias)


def _init_attention(attn: nn.Module, config, layer_idx: int, qkv_bias: bool, o_bias: bool) -> None:
    """Set the attributes the stock attention forward reads, with this layer's head counts."""
    nn.Module.__init__(attn)
    heads = config.layer_num_attention_heads[layer_idx]
    kv_heads = config.layer_num_key_value_heads[layer_idx]
    d = config.head_dim
    attn.config = config  # the shared config, so set_attn_implementation reaches every layer
    attn.layer_idx = layer_idx
    attn.head_dim = d
    attn.num_heads = heads
    attn.num_key_value_heads = kv_heads
    attn.num_key_value_groups = heads // kv_heads if kv_heads else 0
    attn.scaling = d**-0.5
    attn.attention_dropout = config.attention_dropout
    attn.is_causal = True
    attn.q_proj = _linear(config.hidden_size, heads * d, qkv_bias)
    attn.k_proj = _linear(config.hidden_size, kv_heads * d, qkv_bias)
    attn.v_proj = _linear(config.hidden_size, kv_heads * d, qkv_bias)
    attn.o_proj = _linear(heads * d, config.hidden_size, o_bias or getattr(config, "o_proj_bias", False))


def _init_mlp(mlp: nn.Module, config, layer_idx: int, bias: bool, act: str | None = None) -> None:
    nn.Module.__init__(mlp)
    mlp.config = config
    mlp.hidden_size = config.hidden_size
    mlp.intermediate_size = config.layer_intermediate_size[layer_idx]
    mlp.gate_proj = _linear(mlp.hidden_size, mlp.intermediate_size, bias)
    mlp.up_proj = _linear(mlp.hidden_size, mlp.intermediate_size, bias)
    mlp.down_proj = _linear(mlp.intermediate_size, mlp.hidden_size, bias or getattr(config, "down_proj_bias", False))
    mlp.act_fn = ACT2FN[act or config.hidden_act]


def _init_layer(layer: nn.Module, config, layer_idx: int, attn_cls, headless_cls, mlp_cls, norm_cls) -> None:
    GradientCheckpointingLayer.__init__(layer)
    layer.hidden_size = config.hidden_size
    heads = config.layer_num_attention_heads[layer_idx]
    layer.self_attn = (attn_cls if heads else headless_cls)(config, layer_idx)
    layer.mlp = mlp_cls(config, layer_idx)
    layer.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
    layer.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)


def _init_decoder(model: nn.Module, config, layer_cls, norm_cls, rotary_cls, embed_cls=nn.Embedding,
                  **embed_kwargs) -> None:
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = embed_cls(config.vocab_size, config.hidden_size, model.padding_idx, **embed_kwargs)
    model.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
    model.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = rotary_cls(config=config)
    model.gradient_checkpointing = False


class _HeadlessAttention:
    """Mixin for a layer whose attention block was removed (0 heads). Only such layers get it:
    layers with heads keep the stock ``forward`` itself, whose source vLLM's Transformers backend
    reads to find the attention-interface call it replaces (a wrapper would hide it)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        *lead, _ = hidden_states.shape
        if past_key_values is not None:
            placeholder = hidden_states.new_zeros(lead[0], 1, lead[1], 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(*lead, 0)), None


# ---- Llama ----------------------------------------------------------------------------------------


class SlimLlamaAttention(LlamaAttention):
    def __init__(self, config: SlimLlamaConfig, layer_idx: int):
        _init_attention(self, config, layer_idx, config.attention_bias, config.attention_bias)


class SlimLlamaHeadlessAttention(_HeadlessAttention, SlimLlamaAttention):
    pass


class SlimLlamaMLP(LlamaMLP):
    def __init__(self, config: SlimLlamaConfig, layer_idx: int):
        _init_mlp(self, config, layer_idx, config.mlp_bias)


class SlimLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SlimLlamaConfig, layer_idx: int):
        _init_layer(self, config, layer_idx, SlimLlamaAttention, SlimLlamaHeadlessAttention, SlimLlamaMLP, LlamaRMSNorm)


class SlimLlamaModel(LlamaModel):
    config_class = SlimLlamaConfig
    config: SlimLlamaConfig
    _no_split_modules = ["SlimLlamaDecoderLayer"]

    def __init__(self, config: SlimLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        _init_decoder(self, config, SlimLlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
        self.post_init()


class SlimLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimLlamaConfig
    config: SlimLlamaConfig
    _no_split_modules = ["SlimLlamaDecoderLayer"]

    def __init__(self, config: SlimLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SlimLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---- Qwen2 ----------------------------------------------------------------------------------------


class SlimQwen2Attention(Qwen2Attention):
    def __init__(self, config: SlimQwen2Config, layer_idx: int):
        _init_attention(self, config, layer_idx, qkv_bias=True, o_bias=False)
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None


class SlimQwen2HeadlessAttention(_HeadlessAttention, SlimQwen2Attention):
    pass


class SlimQwen2MLP(Qwen2MLP):
    def __init__(self, config: SlimQwen2Config, layer_idx: int):
        _init_mlp(self, config, layer_idx, bias=False)


class SlimQwen2DecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config: SlimQwen2Config, layer_idx: int):
        _init_layer(self, config, layer_idx, SlimQwen2Attention, SlimQwen2HeadlessAttention, SlimQwen2MLP, Qwen2RMSNorm)


class SlimQwen2Model(Qwen2Model):
    config_class = SlimQwen2Config
    config: SlimQwen2Config
    _no_split_modules = ["SlimQwen2DecoderLayer"]

    def __init__(self, config: SlimQwen2Config):
        Qwen2PreTrainedModel.__init__(self, config)
        _init_decoder(self, config, SlimQwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()


class SlimQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = SlimQwen2Config
    config: SlimQwen2Config
    _no_split_modules = ["SlimQwen2DecoderLayer"]

    def __init__(self, config: SlimQwen2Config):
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = SlimQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---- Gemma 3 (text) -------------------------------------------------------------------------------
# Four norms per layer, q_norm / k_norm over head_dim (kept whatever the head count), scaled
# embeddings, query_pre_attn_scalar and sliding-window layers: the stock forward handles all of it,
# including the hybrid KV cache, where a 0-head layer's placeholder counts tokens like any other.


class SlimGemma3Attention(Gemma3Attention):
    def __init__(self, config: SlimGemma3Config, layer_idx: int):
        _init_attention(self, config, layer_idx, config.attention_bias, config.attention_bias)
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.is_causal = not config.use_bidirectional_attention
        self.layer_type = config.layer_types[layer_idx]
        self.is_sliding = self.layer_type == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.attn_logit_softcapping = config.attn_logit_softcapping
        self.q_norm = Gemma3RMSNorm(dim=config.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(dim=config.head_dim, eps=config.rms_norm_eps)


class SlimGemma3HeadlessAttention(_HeadlessAttention, SlimGemma3Attention):
    pass


class SlimGemma3MLP(Gemma3MLP):
    def __init__(self, config: SlimGemma3Config, layer_idx: int):
        _init_mlp(self, config, layer_idx, bias=False, act=config.hidden_activation)


class SlimGemma3DecoderLayer(Gemma3DecoderLayer):
    def __init__(self, config: SlimGemma3Config, layer_idx: int):
        _init_layer(self, config, layer_idx, SlimGemma3Attention, SlimGemma3HeadlessAttention, SlimGemma3MLP, Gemma3RMSNorm)
        self.config = config
        self.layer_idx = layer_idx
        self.pre_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SlimGemma3TextModel(Gemma3TextModel):
    config_class = SlimGemma3Config
    config: SlimGemma3Config
    _no_split_modules = ["SlimGemma3DecoderLayer"]

    def __init__(self, config: SlimGemma3Config):
        Gemma3PreTrainedModel.__init__(self, config)
        _init_decoder(self, config, SlimGemma3DecoderLayer, Gemma3RMSNorm, Gemma3RotaryEmbedding,
                      Gemma3TextScaledWordEmbedding, embed_scale=config.hidden_size**0.5)
        self.post_init()


class SlimGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = SlimGemma3Config
    config: SlimGemma3Config
    _no_split_modules = ["SlimGemma3DecoderLayer"]

    def __init__(self, config: SlimGemma3Config):
        Gemma3PreTrainedModel.__init__(self, config)
        self.model = SlimGemma3TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "SlimGemma3ForCausalLM",
    "SlimGemma3TextModel",
    "SlimLlamaForCausalLM",
    "SlimLlamaModel",
    "SlimQwen2ForCausalLM",
    "SlimQwen2Model",
]
