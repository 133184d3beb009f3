"""Configurations of structurally pruned Llama / Qwen2 / Gemma 3 models (the slimgpt saved format).

Stock configs describe every decoder layer with one ``num_attention_heads`` /
``num_key_value_heads`` / ``intermediate_size``. Pruning leaves each layer with its own sizes, so
these configs add three per-layer lists (one entry per decoder layer):

- ``layer_num_attention_heads``: query heads kept in layer ``i`` (0 = attention block removed)
- ``layer_num_key_value_heads``: key/value heads kept (0 exactly when the query heads are 0)
- ``layer_intermediate_size``: FFN channels kept (0 = MLP block removed)

The stock fields keep the *original* model's values, so tools that read them still see a valid
architecture; ``head_dim`` is always explicit because it cannot be derived from a pruned layer.
Missing lists default to the stock values (an unpruned model).

The same sizes are mirrored as transformers' ``per_layer_config`` (transformers 5.15+; only the
layers and fields that differ from the stock values) with ``allow_global_per_layer_attribute_access``,
so that readers of the heterogeneous-config interface see each layer's own sizes and the stock
fields stay readable: vLLM's Transformers backend sizes each layer's attention and KV cache from
it, which is what lets ``vllm serve FOLDER --trust-remote-code --model-impl transformers`` run a
pruned folder as saved (see ``slimgpt.export.vllm`` for what it cannot run). The lists stay the
source of truth: the mirror is rebuilt from them whenever a config is made.

``o_proj_bias`` / ``down_proj_bias`` give every layer's o_proj / down_proj a bias even where the stock
architecture has none: methods with bias compensation (FLAP) fold removed channels' mean
contribution into it.

This file is copied beside every saved model and loaded with ``trust_remote_code=True`` in
processes that never imported slimgpt: it may import only torch and transformers.
"""

from __future__ import annotations

from transformers import Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config

LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
#: transformers' per-layer names of the same sizes (``per_layer_config`` entries)
PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _complete_layer_lists(cfg: LlamaConfig | Qwen2Config | Gemma3TextConfig) -> None:
    """Fill missing per-layer lists with the stock sizes and check that the lists describe a
    model the modelling code can build (raises ``ValueError`` otherwise); then mirror them as
    ``per_layer_config``."""
    heterogeneous = hasattr(type(cfg), "per_layer_config")  # transformers 5.15+
    if heterogeneous:
        cfg.per_layer_config = None  # a loaded mirror is rebuilt below; the stock fields are read first
    n = cfg.num_hidden_layers
    defaults = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    for name, default in zip(LAYER_FIELDS, defaults):
        value = getattr(cfg, name)
        value = [default] * n if value is None else [int(v) for v in value]
        if len(value) != n or any(v < 0 for v in value):
            raise ValueError(f"{name} must list {n} non-negative sizes (one per layer), got {value}")
        setattr(cfg, name, value)
    if cfg.head_dim is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i, (heads, kv) in enumerate(zip(cfg.layer_num_attention_heads, cfg.layer_num_key_value_heads)):
        if (heads == 0) != (kv == 0) or (kv and heads % kv):
            raise ValueError(f"layer {i}: {heads} query heads cannot share {kv} key/value heads evenly")
    if heterogeneous:
        stock = [getattr(cfg, key) for key in PER_LAYER_KEYS]
        per_layer = {}
        for i, sizes in enumerate(zip(*(getattr(cfg, name) for name in LAYER_FIELDS))):
            differ = {key: size for key, size, full in zip(PER_LAYER_KEYS, sizes, stock) if size != full}
            if differ:
                per_layer[str(i)] = differ
        cfg.allow_global_per_layer_attribute_access = True  # readers of the stock fields get the unpruned sizes
        cfg.per_layer_config = per_layer or None


# transformers 5.15+: reads a field without the heterogeneous-config check (None before 5.15)
_read_stock = getattr(PretrainedConfig, "_getattr_without_heterogeneous_validation", None)


class _StockSizes:
    """Mixin: the stock ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` are
    the unpruned model's by design, so reading them is never the ambiguity transformers warns about
    for heterogeneous configs (its validators read them on every config made); each layer's own
    sizes are in the lists and ``per_layer_config``."""

    def __getattribute__(self, key: str):
        if key in PER_LAYER_KEYS and _read_stock is not None:
            return _read_stock(self, key)
        return super().__getattribute__(key)


class SlimLlamaConfig(_StockSizes, LlamaConfig):
    """``LlamaConfig`` with per-layer head and channel counts."""

    model_type = "slimgpt_llama"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _complete_layer_lists(self)


class SlimQwen2Config(_StockSizes, Qwen2Config):
    """``Qwen2Config`` with per-layer head and channel counts."""

    model_type = "slimgpt_qwen2"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    head_dim: int | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _complete_layer_lists(self)


class SlimGemma3Config(_StockSizes, Gemma3TextConfig):
    """``Gemma3TextConfig`` (text-only Gemma 3) with per-layer head and channel counts."""

    model_type = "slimgpt_gemma3"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _complete_layer_lists(self)


__all__ = ["SlimGemma3Config", "SlimLlamaConfig", "SlimQwen2Config"]
