"""Qwen2 / Qwen2.5: Llama layout plus biases on q/k/v (handled by the base parameter count)."""

from __future__ import annotations

from slimgpt.arch.base import ModelAdapter, register


@register
class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2", "slimgpt_qwen2")
