"""Nemotron-NAS ("DeciLM") configuration for folders written by ``slimgpt export --to vllm``
(the ``deci`` route) and ``--to sglang``.

vLLM's ``DeciLMForCausalLM`` (``model_type: nemotron-nas``) builds each decoder layer from
``config.block_configs[i]`` and reads it by attribute: ``.attention.no_op``,
``.attention.n_heads_in_group`` (key/value heads = ``num_attention_heads // n_heads_in_group``),
``.ffn.no_op``, ``.ffn.intermediate_size`` or ``.ffn.ffn_mult``. transformers has no config class for
this model type, so the folder carries this one (``auto_map``, loaded with ``trust_remote_code``):
a Llama config whose ``block_configs`` entries are dicts that also answer attribute reads, so the
config still serialises to plain JSON.

This file is copied into the exported folder and imported by processes without slimgpt (vLLM's,
with transformers 5.19 there): it may import only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class BlockSection(dict):
    """A ``dict`` whose keys read as attributes (a missing key is an ``AttributeError``, so
    ``hasattr(ffn, "ffn_mult")`` is false when the export wrote a width instead)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _section(value: Any) -> Any:
    if isinstance(value, dict):
        return BlockSection({k: _section(v) for k, v in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    """``LlamaConfig`` plus one ``block_configs`` entry per decoder layer (``{"attention": {...},
    "ffn": {...}}``) and ``qkv_bias`` (q/k/v biases, e.g. Qwen2, apart from ``attention_bias``,
    which vLLM's DeciLM reads as the o_proj bias)."""

    model_type = "nemotron-nas"

    block_configs: list | None = None
    qkv_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is not None:  # None in the default instance transformers makes for diffs
            if len(self.block_configs) != self.num_hidden_layers:
                raise ValueError(f"block_configs must have {self.num_hidden_layers} entries (one per layer), "
                                 f"got {len(self.block_configs)}")
            self.block_configs = [_section(b) for b in self.block_configs]


__all__ = ["BlockSection", "DeciLMConfig"]
