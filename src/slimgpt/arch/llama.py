"""Llama family: Llama 1/2/3, SmolLM2, Mistral-style grouped-query attention."""

from __future__ import annotations

from slimgpt.arch.base import ModelAdapter, register


@register
class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "slimgpt_llama")
