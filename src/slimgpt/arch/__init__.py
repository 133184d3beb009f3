"""Model adapters, one file per architecture family; importing this package registers them all."""

from torch import nn

from slimgpt.arch import gemma3, llama, qwen2  # noqa: F401  (register)
from slimgpt.arch.base import ADAPTERS, HeadGeometry, ModelAdapter
from slimgpt.errors import ModelError

__all__ = ["ADAPTERS", "HeadGeometry", "ModelAdapter", "get_adapter"]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; a clear error for architectures that have none yet."""
    model_type = getattr(model.config, "model_type", "?")
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise ModelError(
            f"architecture '{model_type}' is not supported yet (supported: {', '.join(sorted(ADAPTERS))}); "
            "add an adapter in src/slimgpt/arch/"
        )
    return cls(model)
