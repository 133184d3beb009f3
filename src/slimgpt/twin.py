"""The model where, and in what precision, a search runs it.

Searches (BlockPruner's block ranking, ShortGPT's scores, the searched allocation's database and
candidates) only *rank* choices, so they may run on a cheaper copy of the model than the one that
is pruned: a bfloat16 twin on a CPU with native bf16 matrix units, the whole model on the GPU
instead of streamed layer by layer. The pruned model's own weights are never changed here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimgpt.arch import get_adapter
from slimgpt.arch.base import ModelAdapter


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run with the whole model on ``device`` (a block search touches every layer ``R²/2`` times
    per round, so streaming layers in and out would dominate), and put it back afterwards."""
    home = next(model.parameters()).device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_search_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a search runs in: ``auto`` is bfloat16 for a float32 model on a CPU with AMX or
    AVX512-BF16 (2-3× faster there; the paper searched in fp16 on GPUs), else the model's own dtype."""
    if name != "auto":
        return getattr(torch, name)
    native_bf16 = device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    if model_dtype == torch.float32 and native_bf16:
        return torch.bfloat16
    return model_dtype


@contextmanager
def search_adapter(adapter: ModelAdapter, device: torch.device, dtype: torch.dtype) -> Iterator[ModelAdapter]:
    """An adapter over the model on ``device`` in ``dtype``: the model itself when it already has
    that dtype, else a copy whose parameters are cast one by one (no full-precision duplicate is
    ever made; buffers such as RoPE frequencies keep their precision). The model is untouched."""
    model = adapter.model
    if next(model.parameters()).dtype == dtype:
        with on_device(model, device):
            yield adapter
        return
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().to(device=device, dtype=dtype), requires_grad=False)
        for p in model.parameters()
    }
    twin = copy.deepcopy(model, memo).to(device)
    try:
        yield get_adapter(twin)
    finally:
        del twin, memo


__all__ = ["SEARCH_DTYPES", "on_device", "resolve_search_dtype", "search_adapter"]
