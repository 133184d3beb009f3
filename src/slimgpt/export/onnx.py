"""ONNX export (``torch.onnx.export(..., dynamo=True)``) of the forward pass: ``input_ids`` →
``logits``, for onnxruntime.

Scope: one full forward without a KV cache (no ``past_key_values`` inputs/outputs), so it serves
scoring and embedding-style use; generating with it recomputes the whole prefix every token. The
batch and sequence axes are dynamic. No attention mask input: every sequence is treated as
unpadded (pad on the right and ignore the padded positions' logits).

Removed blocks are zero-sized linears in the slim model; a matmul with an empty inner dimension
is legal in ONNX, but to keep the graph free of zero-sized initialisers (some runtimes reject
them) the exported module replaces a removed block by its exact output: zero, or the bias of the
block's output projection.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt.errors import ConfigError


class _Constant(nn.Module):
    """Stands in for a removed block: returns ``bias`` (or 0) broadcast over the input's tokens."""

    def __init__(self, hidden: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(hidden))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return torch.zeros_like(hidden_states) + self.bias


class _AttentionConstant(_Constant):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return torch.zeros_like(hidden_states) + self.bias, None


class LogitsOnly(nn.Module):
    """``input_ids → logits`` without cache, the exported signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _without_empty_blocks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose removed blocks are :class:`_Constant` modules."""
    import copy

    from slimgpt.arch import get_adapter

    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    for layer in adapter.layers:
        if adapter.geometry(layer).num_heads == 0:
            layer.self_attn = _AttentionConstant(hidden, adapter.attention(layer).o.bias)
        if adapter.intermediate_size(layer) == 0:
            layer.mlp = _Constant(hidden, adapter.mlp(layer).down.bias)
    return model


def export_onnx(model: Any, tokenizer: Any, out: str | Path, overwrite: bool = False, opset: int = 18) -> Path:
    """Write ``model.onnx`` (+ tokenizer files) into folder ``out``; returns the folder."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install 'slimgpt[export]'") from None
    from slimgpt.io import atomic_path

    module = LogitsOnly(_without_empty_blocks(model)).eval()
    example = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.long) % model.config.vocab_size
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False)
    with atomic_path(out, overwrite) as tmp:
        program.save(str(tmp / "model.onnx"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        note = {"inputs": {"input_ids": "int64 [batch, sequence]"}, "outputs": {"logits": "float [batch, sequence, vocab]"},
                "kv_cache": False, "attention_mask": False, "opset": opset,
                "exported_from": getattr(model.config, "_name_or_path", None)}
        (tmp / "slimgpt_onnx.json").write_text(json.dumps(note, indent=2) + "\n")
    return Path(out).expanduser().resolve()


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs ~1,600 INFO lines (onnxscript's optimiser, torch.export) and
    torchvision warnings; keep the terminal to our own summary line (``-v`` shows them)."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._export",
             "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    verbose = logging.getLogger("slimgpt").isEnabledFor(logging.DEBUG)
    for lg in loggers:
        if not verbose:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


__all__ = ["LogitsOnly", "export_onnx"]
