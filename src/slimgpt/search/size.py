"""How big the level database of ``--schedule search`` gets, without building it.

:func:`estimate_database_bytes` follows :func:`~slimgpt.search.database.build_database` file by
file: per layer, one file per stored attention level (kept heads' ``o_proj`` columns) and per
stored FFN level (kept channels' ``down_proj`` columns), each ``rows x kept`` in the variants'
dtype plus int32 kept indices, a float32 error and ``torch.save``'s per-file overhead. It is exact
where no two GQA shapes remove the same parameters with different query heads (any MHA model) and
an upper bound otherwise (the build keeps the tie's lower-error shape, the estimate its widest).

``python -m slimgpt.search.size`` prints it for the presets below (or ``config.json`` paths) next
to the layers' own size and the earlier layout (float32, every 64 channels, F x F Hessians).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgpt.schedule import LayerSpace, LayerWidth
from slimgpt.search.levels import DEFAULT_LEVELS, ladders
from slimgpt.serving import Constraint

FILE_OVERHEAD = 2_160  # torch.save's zip headers (they repeat the 12-character file stem) and 64-byte alignment, per file (measured 2,138-2,182 bytes)

# architecture numbers from the models' config.json files (hidden, FFN, heads, kv heads, layers, head_dim, qkv bias)
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                         num_hidden_layers=24, attention_bias=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=32),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                          num_hidden_layers=80),
}


@dataclass(frozen=True)
class LayerShape:
    """What the database's size depends on: the layer's space, the output projections' rows and
    the head width."""

    space: LayerSpace
    hidden: int
    head_dim: int

    @property
    def params(self) -> int:
        return self.space.params


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def layer_shapes(config: Any) -> list[LayerShape]:
    """Per-layer shapes from a transformers config (object or dict; a slim model's per-layer
    ``layer_intermediate_size`` / ``layer_num_attention_heads`` honoured)."""
    hidden, layers = int(_get(config, "hidden_size")), int(_get(config, "num_hidden_layers"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads") or heads)
    d = int(_get(config, "head_dim") or hidden // heads)
    qkv_bias = bool(_get(config, "attention_bias", _get(config, "model_type") == "qwen2"))
    mlp_bias = bool(_get(config, "mlp_bias", False))
    ffn = _get(config, "layer_intermediate_size") or [int(_get(config, "intermediate_size"))] * layers
    q_heads = _get(config, "layer_num_attention_heads") or [heads] * layers
    out = []
    for i in range(layers):
        per_q = 2 * d * hidden + (d if qkv_bias else 0)
        per_kv = 2 * d * hidden + (2 * d if qkv_bias else 0)
        per_channel = 3 * hidden + (2 if mlp_bias else 0)
        out.append(LayerShape(LayerSpace(int(q_heads[i]), kv, int(ffn[i]), per_q, per_kv, per_channel), hidden, d))
    return out


def _file(rows: int, kept: int, width: int, itemsize: int) -> int:
    return rows * kept * width * itemsize + 4 * kept + 4 + FILE_OVERHEAD


def estimate_database_bytes(model: Any, levels: int | None = DEFAULT_LEVELS, dtype: torch.dtype = torch.bfloat16,
                            ffn_step: int | None = None, hessians: bool = False,
                            constraint: Constraint | None = None) -> int:
    """Bytes of the variant files of :func:`~slimgpt.search.database.build_database` for ``model``
    (a transformers config, a dict of its fields, or a list of :class:`LayerShape`) at ``levels``
    (or the full ladders of an explicit ``ffn_step``), variants in ``dtype``; ``hessians`` adds the
    float32 ``F x F`` Hessian per layer the earlier layout kept; ``constraint``: the ladders of a
    ``--target`` run (vLLM's narrowest attention is a stored level, not a removed block)."""
    shapes = model if isinstance(model, list) else layer_shapes(model)
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for sh in shapes:
        s = sh.space
        attn, ffn, _ = ladders(s, levels, ffn_step, constraint)
        for _, options in attn[1:]:  # dense and removed store nothing
            heads = max(LayerWidth(g, r, 0, 0.0).heads(s) for g, r in options)
            if heads:
                total += _file(sh.hidden, heads, sh.head_dim, size)
        total += sum(_file(sh.hidden, c, 1, size) for c in ffn[1:-1])
        if hessians:
            total += 4 * s.channels ** 2
    return total


def layers_bytes(model: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """The decoder layers' attention and MLP weights in ``dtype`` (what the goal ``<= 2x`` is measured against)."""
    shapes = model if isinstance(model, list) else layer_shapes(model)
    return sum(sh.params for sh in shapes) * torch.empty(0, dtype=dtype).element_size()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m slimgpt.search.size", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help=f"presets ({', '.join(PRESETS)}) or config.json paths (default: all presets)")
    p.add_argument("--levels", type=int, default=DEFAULT_LEVELS)
    p.add_argument("--dtype", default="bfloat16", help="the variants' dtype (the model's)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    print(f"| model | layers ({a.dtype}) | database, {a.levels} levels ({a.dtype}) | x layers "
          "| earlier layout (float32, 64-channel step, Hessians) |")
    print("|---|---:|---:|---:|---:|")
    for name in a.models or list(PRESETS):
        cfg = PRESETS[name] if name in PRESETS else json.loads(Path(name).read_text())
        new, base = estimate_database_bytes(cfg, a.levels, dtype), layers_bytes(cfg, dtype)
        old = estimate_database_bytes(cfg, None, torch.float32, ffn_step=64, hessians=True)
        print(f"| {name} | {base / 1e9:,.1f} GB | {new / 1e9:,.1f} GB | {new / base:.2f} | {old / 1e9:,.1f} GB |")


if __name__ == "__main__":
    main()
