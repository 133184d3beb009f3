"""GGUF export for llama.cpp, using its ``deci`` architecture (per-layer head and FFN counts).

llama.cpp's ``llama`` architecture has one head count per model; ``deci`` (written for NVIDIA's
Nemotron pruned Llamas) reads ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
``deci.feed_forward_length`` as per-layer arrays, so a SlimGPT model keeps its real sizes and its
speed-up. Tensor names and keys are gguf's (``MODEL_ARCH.DECI`` in ``gguf/constants.py``).

Three things llama.cpp's ``deci`` code needs that the slim format does not have:

- **Rotary layout**: HF Llama rotates the two *halves* of each head, llama.cpp (``deci`` uses
  "normal" rope) rotates *adjacent pairs*, so the q and k rows of every head are permuted
  (:func:`permute_rope`), per layer with the layer's *own* head count, as llama.cpp's converter does.
- **Layers without an MLP**: ``deci`` skips a layer whose feed-forward length is 0 *including its
  attention residual*, so such layers get a 1-wide MLP whose weights are zero (adds exactly 0).
- **Layer 0 without attention**: llama.cpp derives the head size from layer 0's head count (0 →
  head size 0 for every layer), so an attention-free layer 0 gets one head with zero q/k/v/o
  weights (its output is exactly 0: uniform attention over zero values through a zero o_proj).
  Other attention-free layers are written as ``head_count = 0`` without attention tensors (or,
  when o_proj has a non-zero bias that the slim layer still adds, with the same zero head).

**Weight types** (``dtype``, the CLI's ``--gguf-type``): ``f32``, ``f16`` (the CLI's default: half
the size, within f16 rounding of the weights), ``bf16``, or ``q8_0`` (8-bit blocks of 32 with an
f16 scale, about a quarter of f32: SmolLM2-135M's 513 MB of fp32 weights become about 145 MB),
written with the ``gguf`` package's own quantiser, so no ``llama-quantize`` is needed. Norms and
biases stay f32; a q8_0 matrix whose rows are not a multiple of 32 wide (a pruned FFN width such as
1,100) is written f16, as llama.cpp's converter does.

**Which llama.cpp reads it**: builds with the ``deci`` architecture, added in December 2024
(ggml-org/llama.cpp#10669, Llama-3.1-Nemotron-51B; layers with no attention or no MLP at all were
completed in April 2025, #12843), so any llama.cpp, llama-cpp-python, ollama or LM Studio release
from mid-2025 on (f32 logits verified with llama-cpp-python 0.3.36: opt-in test
``SLIMGPT_LLAMACPP=1``; the other types are ggml's standard ones, read by the same code). Older
builds stop with "unknown model architecture: 'deci'"; bf16 needs a build from mid-2024 or later.

The tokenizer goes in through gguf's vocab helpers (``BpeVocab`` for byte-level BPE, ``LlamaHfVocab``
for SentencePiece-style tokenizers, ``SpecialVocab`` for merges, special ids and chat template).
``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer regex) cannot be read off a tokenizer reliably;
it is taken from the model's zoo entry or architecture, or given explicitly.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgpt.defaults import GGUF_TYPES
from slimgpt.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

ARCH = "deci"
# zoo model → llama.cpp pre-tokenizer (as in the zoo's source GGUF files)
ZOO_PRE = {"smollm2-135m": "smollm", "qwen2.5-0.5b": "qwen2", "qwen2.5-1.5b": "qwen2"}
DTYPES = GGUF_TYPES  # f32, f16, bf16, q8_0


@dataclass(frozen=True)
class GGUFLayer:
    """Sizes of one layer as written: ``dummy_head`` / ``dummy_mlp`` mark the zero stand-ins."""

    heads: int
    kv_heads: int
    ff: int
    dummy_head: bool = False
    dummy_mlp: bool = False


def gguf_layers(model: Any) -> list[GGUFLayer]:
    """Per-layer sizes written to the GGUF (see the module docstring for the stand-ins)."""
    from slimgpt.arch import get_adapter

    adapter = get_adapter(model)
    out = []
    for i, layer in enumerate(adapter.layers):
        g = adapter.geometry(layer)
        ff = adapter.intermediate_size(layer)
        o_bias = adapter.attention(layer).o.bias
        dummy_head = g.num_heads == 0 and (i == 0 or (o_bias is not None and bool(o_bias.any())))
        heads, kv = (1, 1) if dummy_head else (g.num_heads, g.num_kv_heads)
        out.append(GGUFLayer(heads, kv, max(ff, 1), dummy_head, ff == 0))
    return out


def permute_rope(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` of every head → llama.cpp's interleaved
    ``[x_0, y_0, x_1, y_1, ...]`` (works on weights ``(heads*d, in)`` and biases ``(heads*d,)``)."""
    if w.shape[0] % head_dim:
        raise ModelError(f"rows {w.shape[0]} are not a multiple of head_dim {head_dim}")
    heads = w.shape[0] // head_dim
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_keys(writer: Any, config: Any) -> torch.Tensor | None:
    """Rotary settings; returns llama.cpp's ``rope_freqs`` tensor for llama3-style scaling."""
    import gguf

    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return None
    if kind == "llama3":
        # llama.cpp divides each rotary frequency by rope_freqs[i]: the ratio of the plain to the
        # llama3-scaled inverse frequencies, both as transformers computes them.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        d = config.head_dim
        plain = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        return (plain / scaled.double()).float()
    raise ModelError(f"rope scaling '{kind}' has no GGUF mapping here; use --to padded and llama.cpp's converter")


def _source_zoo_name(model: Any) -> str | None:
    """The zoo name the model descends from, via slimgpt.json / slimgpt_source.json."""
    folder = Path(getattr(model.config, "_name_or_path", "") or "").expanduser()
    for _ in range(3):  # finetuned → pruned → converted zoo folder
        if not folder.is_dir():
            return None
        src = folder / "slimgpt_source.json"
        if src.is_file():
            return json.loads(src.read_text()).get("zoo_name")
        meta = folder / "slimgpt.json"
        if not meta.is_file():
            return None
        name = json.loads(meta.read_text()).get("config", {}).get("model")
        if name in ZOO_PRE:
            return name
        folder = Path(name or "").expanduser()
    return None


def tokenizer_pre(model: Any, tokenizer: Any) -> str:
    """llama.cpp pre-tokenizer name: the zoo source's, else by architecture, else ``default``."""
    zoo = _source_zoo_name(model)
    if zoo in ZOO_PRE:
        return ZOO_PRE[zoo]
    if model.config.model_type.endswith("qwen2"):
        return "qwen2"
    if len(tokenizer) in (128256, 128257):
        return "llama-bpe"
    log.warning("could not tell llama.cpp's pre-tokenizer for this tokenizer; writing 'default' "
                "(text may tokenise differently; pass --tokenizer-pre NAME to set it)")
    return "default"


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """Token list, types, merges/scores and special tokens through gguf's vocab helpers."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        vocab: Any
        try:
            vocab, model_name = BpeVocab(folder), "gpt2"
        except (FileNotFoundError, KeyError, ValueError):
            try:
                vocab, model_name = LlamaHfVocab(folder), "llama"
            except Exception as exc:
                raise ModelError(f"GGUF export supports byte-level BPE and SentencePiece-style tokenizers "
                                 f"({type(exc).__name__}: {exc}); this tokenizer is neither") from None
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
            scores.append(score)
            types.append(kind)
        if model_name == "gpt2":  # HF added tokens: special → CONTROL, others → USER_DEFINED
            for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
                if idx < len(types):
                    types[idx] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        if len(tokens) > vocab_size:
            raise ModelError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
        for i in range(len(tokens), vocab_size):  # padded embedding rows, as llama.cpp's converter writes them
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if model_name == "llama":
            writer.add_token_scores(scores)
        special = SpecialVocab(folder, load_merges=model_name == "gpt2", n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
        if "bos" not in special.add_special_token:  # say what HF does, rather than llama.cpp's default
            from slimgpt.data.calibration import needs_bos

            writer.add_add_bos_token(needs_bos(tokenizer))


def _array(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """Matrices in the chosen type, vectors (norms, biases) always f32, as llama.cpp expects; a
    q8_0 matrix whose rows do not split into 32-wide blocks falls back to f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    a = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    try:
        return gguf.quants.quantize(a, qtype), qtype
    except gguf.quants.QuantError:
        return gguf.quants.quantize(a, Q.F16), Q.F16


def write_gguf(model: Any, tokenizer: Any, path: Path, dtype: str = "f32", pre: str | None = None) -> None:
    """Write ``model`` (slim or stock Llama/Qwen2) as a ``deci`` GGUF file at ``path``, matrices in
    ``dtype`` (f32, f16, bf16 or q8_0; see the module docstring)."""
    import gguf

    from slimgpt.arch import get_adapter

    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF type '{dtype}'; choose one of: {', '.join(DTYPES)}")
    config = model.config
    if "gemma3" in config.model_type:
        raise ModelError("GGUF export cannot express Gemma 3: llama.cpp's 'deci' architecture has no post-attention/"
                         "post-feedforward norms, q/k norms or sliding-window layers; use the slim folder or --to padded")
    if not config.model_type.endswith(("llama", "qwen2")):
        raise ModelError(f"GGUF export supports Llama and Qwen2 models, not '{config.model_type}'")
    if getattr(config, "use_sliding_window", False):
        raise ModelError("sliding-window attention has no deci GGUF mapping; use --to padded")
    if tokenizer is None:
        raise ModelError("GGUF export needs the tokenizer; save it into the model folder")
    adapter = get_adapter(model)
    layers = gguf_layers(model)
    d = adapter.geometry(adapter.layers[0]).head_dim or config.head_dim
    hidden = config.hidden_size
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "slimgpt-model").name or "slimgpt-model")
    writer.add_block_count(len(layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length([layer.ff for layer in layers])
    writer.add_head_count([layer.heads for layer in layers])
    writer.add_head_count_kv([layer.kv_heads for layer in layers])
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)
    rope_freqs = _rope_keys(writer, config)
    add_tokenizer(writer, tokenizer, int(config.vocab_size), pre or tokenizer_pre(model, tokenizer))

    def put(kind: Any, tensor: torch.Tensor, bid: int | None = None, suffix: str = "weight") -> None:
        name = names[kind].format(bid=bid) + f".{suffix}"
        array, qtype = _array(tensor, dtype)
        writer.add_tensor(name, array, raw_dtype=qtype)

    put(T.TOKEN_EMBD, adapter.decoder.embed_tokens.weight)
    put(T.OUTPUT_NORM, adapter.decoder.norm.weight)
    if not config.tie_word_embeddings:
        put(T.OUTPUT, model.lm_head.weight)
    if rope_freqs is not None:
        put(T.ROPE_FREQS, rope_freqs)
    for i, (layer, spec) in enumerate(zip(adapter.layers, layers)):
        a, m = adapter.attention(layer), adapter.mlp(layer)
        if spec.dummy_head:
            put(T.ATTN_NORM, layer.input_layernorm.weight, i)
            zeros = torch.zeros(d, hidden)
            for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
                put(kind, zeros, i)
            put(T.ATTN_OUT, zeros.T, i)
            if a.o.bias is not None:  # a removed block still adds o_proj's bias (modeling_slimgpt)
                put(T.ATTN_OUT, a.o.bias, i, "bias")
        elif spec.heads:
            put(T.ATTN_NORM, layer.input_layernorm.weight, i)
            put(T.ATTN_Q, permute_rope(a.q.weight, d), i)
            put(T.ATTN_K, permute_rope(a.k.weight, d), i)
            put(T.ATTN_V, a.v.weight, i)
            put(T.ATTN_OUT, a.o.weight, i)
            if a.q.bias is not None:
                put(T.ATTN_Q, permute_rope(a.q.bias, d), i, "bias")
                put(T.ATTN_K, permute_rope(a.k.bias, d), i, "bias")
                put(T.ATTN_V, a.v.bias, i, "bias")
            if a.o.bias is not None:
                put(T.ATTN_OUT, a.o.bias, i, "bias")
        put(T.FFN_NORM, layer.post_attention_layernorm.weight, i)
        if spec.dummy_mlp:
            put(T.FFN_GATE, torch.zeros(1, hidden), i)
            put(T.FFN_UP, torch.zeros(1, hidden), i)
            put(T.FFN_DOWN, torch.zeros(hidden, 1), i)
        else:
            put(T.FFN_GATE, m.gate.weight, i)
            put(T.FFN_UP, m.up.weight, i)
            put(T.FFN_DOWN, m.down.weight, i)
        for kind, lin in ((T.FFN_GATE, m.gate), (T.FFN_UP, m.up), (T.FFN_DOWN, m.down)):
            if lin.bias is not None:  # a removed MLP still adds down_proj's bias
                bias = torch.zeros(1) if spec.dummy_mlp and kind != T.FFN_DOWN else lin.bias
                put(kind, bias, i, "bias")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: Any, tokenizer: Any, out: str | Path, overwrite: bool = False, dtype: str = "f32",
                tokenizer_pre: str | None = None) -> Path:
    """Write the ``deci`` GGUF file ``out`` atomically; returns its absolute path."""
    from slimgpt.io import atomic_path

    with atomic_path(out, overwrite, folder=False) as tmp:
        write_gguf(model, tokenizer, tmp, dtype, tokenizer_pre)
    return Path(out).expanduser().resolve()


__all__ = ["GGUFLayer", "export_gguf", "gguf_layers", "permute_rope", "tokenizer_pre", "write_gguf"]
