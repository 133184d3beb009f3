"""Exports of pruned models for engines that do not run the slimgpt format.

The slimgpt format (per-layer head/channel counts, :mod:`slimgpt.modeling`) loads in transformers
and peft. Other engines need one of:

==========  ===========================================  ==========================================
``--to``    what                                         loads in
==========  ===========================================  ==========================================
``gguf``    llama.cpp ``deci`` architecture: per-layer   llama.cpp / llama-cpp-python (logits
            head and FFN counts, keeps the speed-up      checked in the opt-in test
            (Llama/Qwen2; Gemma 3 is refused)            ``SLIMGPT_LLAMACPP=1``); ollama and LM
                                                         Studio run llama.cpp underneath
``padded``  stock Llama/Qwen2/Gemma 3 folder, removed    transformers without custom code (tested);
            heads / channels zero-filled back: same      llama.cpp's ``convert_hf_to_gguf.py``
            outputs, *no* speed-up                       converts it; vLLM/TGI read it as the stock
                                                         architecture (not run here: no GPU)
``onnx``    ``torch.onnx`` (dynamo) graph, input_ids →   onnxruntime (tested)
            logits, no KV cache
==========  ===========================================  ==========================================

vLLM cannot serve the slim format or the ``deci`` GGUF as a pruned model: its Llama/Qwen2 code has
one query-head count per model (its ``DeciLMForCausalLM`` path takes Nemotron's ``block_configs``,
which vary key/value groups and FFN multipliers rounded to multiples of 256, never query heads). The padded export is the way to
serve there, at the dense model's cost.

Every export is written next to its target under a temporary name and renamed into place at the
end (:func:`atomic_path`), so an interrupted export never leaves a half-written file where a good
one was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError
from slimgpt.io import atomic_path

FORMATS = ("gguf", "padded", "onnx")


def export(model: Any, tokenizer: Any, fmt: str, out: str | Path, overwrite: bool = False,
           **options: Any) -> Path:
    """Write ``model`` (slim or stock Llama/Qwen2/Gemma 3) in format ``fmt``; returns the written path.
    Gemma 3 has no GGUF mapping (``deci`` lacks its norms and sliding windows): a one-line ModelError."""
    writers: dict[str, Callable[..., Path]]
    from slimgpt.export.gguf import export_gguf
    from slimgpt.export.onnx import export_onnx
    from slimgpt.export.padded import export_padded

    writers = {"gguf": export_gguf, "padded": export_padded, "onnx": export_onnx}
    if fmt not in writers:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    return writers[fmt](model, tokenizer, out, overwrite=overwrite, **options)


__all__ = ["FORMATS", "atomic_path", "export"]
