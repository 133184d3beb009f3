"""The slimgpt saved format: Llama / Qwen2 with per-layer head and channel counts.

Importing this package registers the two model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` works in-process without ``trust_remote_code``.
Saved folders also carry copies of ``configuration_slimgpt.py`` and ``modeling_slimgpt.py`` (see
:mod:`slimgpt.io`), so processes without slimgpt load them with ``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from slimgpt.modeling.configuration_slimgpt import SlimLlamaConfig, SlimQwen2Config
from slimgpt.modeling.modeling_slimgpt import SlimLlamaForCausalLM, SlimQwen2ForCausalLM

#: stock model_type → (slim config class, slim model class)
SLIM_CLASSES = {
    "llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "slimgpt_llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
    "slimgpt_qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
}


def register() -> None:
    """Register the slim classes with the Auto classes (safe to call repeatedly)."""
    for config_cls, model_cls in {v[0]: v[1] for v in SLIM_CLASSES.values()}.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register()

__all__ = ["SLIM_CLASSES", "SlimLlamaConfig", "SlimLlamaForCausalLM", "SlimQwen2Config",
           "SlimQwen2ForCausalLM", "register"]
