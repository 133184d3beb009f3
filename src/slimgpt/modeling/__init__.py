"""The slimgpt saved format: Llama / Qwen2 / Gemma 3 (text) with per-layer head and channel counts.

Importing this package registers the slim model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` works in-process without ``trust_remote_code``.
Saved folders also carry copies of ``configuration_slimgpt.py`` and ``modeling_slimgpt.py`` (see
:mod:`slimgpt.io`), so processes without slimgpt load them with ``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from slimgpt.modeling.configuration_slimgpt import SlimGemma3Config, SlimLlamaConfig, SlimQwen2Config
from slimgpt.modeling.modeling_slimgpt import (
    SlimGemma3ForCausalLM,
    SlimGemma3TextModel,
    SlimLlamaForCausalLM,
    SlimLlamaModel,
    SlimQwen2ForCausalLM,
    SlimQwen2Model,
)

#: stock model_type → (slim config class, slim model class)
SLIM_CLASSES = {
    "llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "slimgpt_llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
    "slimgpt_qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
    "gemma3_text": (SlimGemma3Config, SlimGemma3ForCausalLM),
    "slimgpt_gemma3": (SlimGemma3Config, SlimGemma3ForCausalLM),
}

#: causal-LM class name → its decoder class name: a saved folder's ``auto_map["AutoModel"]``, which
#: vLLM's Transformers backend builds (it adds its own head)
DECODER_CLASSES = {cls.__name__: base.__name__ for cls, base in ((SlimLlamaForCausalLM, SlimLlamaModel),
                                                                  (SlimQwen2ForCausalLM, SlimQwen2Model),
                                                                  (SlimGemma3ForCausalLM, SlimGemma3TextModel))}

#: model_type of every slim config (what a shrunk model's config says)
SLIM_MODEL_TYPES = frozenset(config_cls.model_type for config_cls, _ in SLIM_CLASSES.values())


def register() -> None:
    """Register the slim classes with the Auto classes (safe to call repeatedly)."""
    for config_cls, model_cls in {v[0]: v[1] for v in SLIM_CLASSES.values()}.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register()

__all__ = ["DECODER_CLASSES", "SLIM_CLASSES", "SLIM_MODEL_TYPES", "SlimGemma3Config", "SlimGemma3ForCausalLM", "SlimLlamaConfig",
           "SlimLlamaForCausalLM", "SlimQwen2Config", "SlimQwen2ForCausalLM", "register"]
