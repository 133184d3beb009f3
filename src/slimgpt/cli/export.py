"""``slimgpt export``: write a pruned model for other engines (gguf, padded, onnx)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt.defaults import DEFAULT_GGUF_TYPE, GGUF_TYPES
from slimgpt.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder (or any Llama/Qwen2/Gemma 3 model folder / zoo name)")
    p.add_argument("--to", required=True, choices=("gguf", "padded", "onnx"),
                   help="gguf: llama.cpp 'deci' file; padded: stock-architecture folder; onnx: onnxruntime folder")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (padded, onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    p.add_argument("--gguf-type", default=DEFAULT_GGUF_TYPE, choices=GGUF_TYPES,
                   help="GGUF matrix type: f32 | f16 (half the size) | bf16 | q8_0 (about a quarter of f32; rows not "
                        "a multiple of 32 wide stay f16); norms stay f32. Read by llama.cpp builds with the 'deci' "
                        "architecture (from 2025 on)")
    p.add_argument("--tokenizer-pre", help="GGUF tokenizer.ggml.pre (default: detected, e.g. smollm, qwen2)")


def run(a: argparse.Namespace) -> int:
    """Export a pruned model for other engines: gguf (llama.cpp), padded (stock architecture), onnx."""
    from slimgpt.preflight import check_model, check_writable

    out = Path(a.out).expanduser()
    if out.exists() and not a.overwrite:
        raise ConfigError(f"output {a.out} exists; pass --overwrite or choose another")
    check_writable(out, "--out")  # before the model is loaded
    check_model(a.model)

    import torch

    from slimgpt.export import export
    from slimgpt.zoo import load_model

    model, tok = load_model(a.model, dtype=torch.float32, device="cpu")
    options = {}
    if a.to == "gguf":
        options = {"dtype": a.gguf_type, "tokenizer_pre": a.tokenizer_pre}
    path = export(model, tok, a.to, a.out, overwrite=a.overwrite, **options)
    size = f" ({path.stat().st_size / 2**20:,.1f} MiB)" if path.is_file() else ""
    print(f"wrote {a.to} export to {path}{size}")
    return 0
