"""Model adapters, one file per architecture family."""

from slimgpt.arch import gemma3, llama, qwen2  # noqa: F401  (register)
from slimgpt.arch.base import ADAPTERS, HeadGeometry, ModelAdapter, get_adapter

__all__ = ["ADAPTERS", "HeadGeometry", "ModelAdapter", "get_adapter"]
