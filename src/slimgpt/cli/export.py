"""``slimgpt export``: write a pruned model for other engines (gguf, padded, onnx)."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder (or any Llama/Qwen2/Gemma 3 model folder / zoo name)")
    p.add_argument("--to", required=True, choices=("gguf", "padded", "onnx"),
                   help="gguf: llama.cpp 'deci' file; padded: stock-architecture folder; onnx: onnxruntime folder")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (padded, onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    p.add_argument("--gguf-type", default="f32", choices=("f32", "f16", "bf16"),
                   help="GGUF weight type of the matrices (norms stay f32); quantise later with llama-quantize")
    p.add_argument("--tokenizer-pre", help="GGUF tokenizer.ggml.pre (default: detected, e.g. smollm, qwen2)")


def run(a: argparse.Namespace) -> int:
    """Export a pruned model for other engines: gguf (llama.cpp), padded (stock architecture), onnx."""
    import torch

    from slimgpt.export import export
    from slimgpt.zoo import load_model

    model, tok = load_model(a.model, dtype=torch.float32, device="cpu")
    options = {}
    if a.to == "gguf":
        options = {"dtype": a.gguf_type, "tokenizer_pre": a.tokenizer_pre}
    out = export(model, tok, a.to, a.out, overwrite=a.overwrite, **options)
    print(f"wrote {a.to} export to {out}")
    return 0
