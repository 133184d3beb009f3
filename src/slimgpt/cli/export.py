"""``slimgpt export``: write a pruned model for other engines (gguf, padded, onnx, vllm, sglang)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt.defaults import DEFAULT_GGUF_TYPE, GGUF_TYPES
from slimgpt.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned folder (or any Llama/Qwen2/Gemma 3 model folder / zoo name)")
    p.add_argument("--to", required=True, choices=("gguf", "padded", "onnx", "vllm", "sglang"),
                   help="gguf: llama.cpp 'deci' file; padded: stock-architecture folder; onnx: onnxruntime folder; "
                        "vllm: folder vLLM serves at the pruned sizes (route chosen from the shapes); "
                        "sglang: DeciLM folder with ffn_mult widths (read, not run)")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (padded, onnx, vllm, sglang)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    p.add_argument("--gguf-type", default=DEFAULT_GGUF_TYPE, choices=GGUF_TYPES,
                   help="GGUF matrix type: f32 | f16 (half the size) | bf16 | q8_0 (about a quarter of f32; rows not "
                        "a multiple of 32 wide stay f16); norms stay f32. Read by llama.cpp builds with the 'deci' "
                        "architecture (from 2025 on)")
    p.add_argument("--route", choices=("auto", "transformers", "deci"), default="auto",
                   help="vllm: which vLLM route to write (default auto: the first that serves the model's shapes, "
                        "transformers before deci); transformers = vLLM's Transformers backend, deci = its own "
                        "DeciLMForCausalLM")
    p.add_argument("--tokenizer-pre", help="GGUF tokenizer.ggml.pre (default: detected, e.g. smollm, qwen2)")


def run(a: argparse.Namespace) -> int:
    """Export a pruned model for other engines: gguf (llama.cpp), padded (stock architecture), onnx,
    vllm / sglang (served at the pruned sizes)."""
    from slimgpt.preflight import check_model, check_writable

    out = Path(a.out).expanduser()
    if out.exists() and not a.overwrite:
        raise ConfigError(f"output {a.out} exists; pass --overwrite or choose another")
    check_writable(out, "--out")  # before the model is loaded
    route = None if a.route == "auto" else a.route
    if route is not None and a.to != "vllm":
        raise ConfigError(f"--route picks one of vLLM's routes; it does not apply to --to {a.to}")
    check_model(a.model, check_config=_servable(a.to, route) if a.to in ("vllm", "sglang") else None)

    import torch

    from slimgpt.export import export
    from slimgpt.zoo import load_model

    model, tok = load_model(a.model, dtype=torch.float32, device="cpu")
    options = {}
    if a.to == "gguf":
        options = {"dtype": a.gguf_type, "tokenizer_pre": a.tokenizer_pre}
    if a.to in ("vllm", "sglang"):
        from slimgpt.export.vllm import choose_route
        from slimgpt.io import source_dtype

        choose_route(model, a.to, route)  # refused in one line before anything is written
        options = {"dtype": source_dtype(a.model), "route": route}  # loaded in float32; written back as stored
    path = export(model, tok, a.to, a.out, overwrite=a.overwrite, **options)
    size = f" ({path.stat().st_size / 2**20:,.1f} MiB)" if path.is_file() else ""
    print(f"wrote {a.to} export to {path}{size}")
    if a.to in ("vllm", "sglang"):
        from slimgpt.export.vllm import read_note

        note = read_note(path)
        print(f"route: {note['route']}; serve it with:\n  {note['serve']}\n  {note['python']}")
        if a.to == "sglang":
            print("(SGLang reads this DeciLM format; read in its code, not run here. vLLM serves it too.)")
        elif note["route"] == "transformers" and all(c for *_, c in note["layer_shapes"]) and _serves_as_saved(a.model):
            print(f"(the pruned folder itself is served the same way: vllm serve {a.model} --trust-remote-code)")
    return 0


def _servable(target: str, route: str | None):
    """A preflight check that refuses, from config.json alone, a model no route of ``target`` serves."""

    def check(folder: Path) -> None:
        from slimgpt.preflight import read_config
        from slimgpt.serving import config_shapes, route_for

        found = config_shapes(read_config(folder))
        if found is not None:
            shapes, family, sliding = found
            route_for(target, shapes, family=family, sliding=sliding, route=route)

    return check


def _serves_as_saved(model: str) -> bool:
    """Whether a folder written by this slimgpt (per_layer_config mirror, auto_map's AutoModel) is there."""
    import json

    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    return "AutoModel" in (cfg.get("auto_map") or {}) and str(cfg.get("model_type", "")).startswith("slimgpt_")
