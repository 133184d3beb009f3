"""Exports: padded (stock architecture, same logits), GGUF ``deci`` (keys, per-layer arrays, shapes,
rotary permutation, and a NumPy re-implementation of llama.cpp's ``deci`` forward pass that must
reproduce the PyTorch logits), ONNX (onnxruntime logits). llama.cpp itself: SLIMGPT_LLAMACPP=1."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conftest import build_tiny
from slimgpt.cli import main
from slimgpt.errors import ConfigError
from slimgpt.export import export
from slimgpt.export.gguf import permute_rope
from slimgpt.export.padded import to_padded
from slimgpt.io import save_pruned
from slimgpt.plan import LayerPlan
from slimgpt.surgery import layer_shapes, shrink_model
from test_surgery import IDS, random_plans, zero_pruned

VOCAB = 300
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


def slim_model(kind: str, seed: int = 0, plans: dict | None = None, **overrides) -> torch.nn.Module:
    """A pruned tiny model: layer 0 without attention, layer 3 without MLP (random_plans)."""
    cfg_cls, model_cls, kw = MODELS[kind]
    model = build_tiny(cfg_cls, model_cls, **{**kw, **overrides})
    plans = plans if plans is not None else random_plans(random.Random(seed), model)
    zero_pruned(model, plans)
    return shrink_model(model, plans)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline (256 bytes + 3 specials + merges = 300 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "pruning large language models, layer by layer"]
    tok.train_from_iterator(text * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ---- padded -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_padded_has_original_shapes_and_same_logits(kind: str, seed: int) -> None:
    slim = slim_model(kind, seed)
    padded = to_padded(slim)
    assert type(padded) is MODELS[kind][1]
    assert layer_shapes(padded) == [{"heads": 8, "kv_heads": MODELS[kind][2]["num_key_value_heads"],
                                     "channels": 96}] * 4
    assert torch.allclose(logits(padded), logits(slim), atol=1e-5, rtol=0)
    ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(logits(padded, ids), logits(slim, ids), atol=1e-5, rtol=0)
    # removed heads / channels are exact zeros; the slim model is untouched
    layer0 = padded.model.layers[0]
    assert not layer0.self_attn.q_proj.weight.any() and not layer0.self_attn.o_proj.weight.any()
    assert not padded.model.layers[3].mlp.down_proj.weight.any()
    assert slim.config.model_type.startswith("slimgpt_")


def test_padded_of_unpruned_model_is_the_original(tiny_qwen2) -> None:
    ref = {k: v.clone() for k, v in tiny_qwen2.state_dict().items()}
    padded = to_padded(shrink_model(tiny_qwen2, {}))
    for name, tensor in padded.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


CHILD_PADDED = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    folder, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
    ids = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(ids).logits
    assert not any(m == "slimgpt" or m.startswith("slimgpt.") for m in sys.modules)
    torch.save({"logits": logits, "cls": type(model).__module__}, out_file)
""")


def test_padded_folder_loads_with_plain_transformers(tiny_tokenizer, tmp_path: Path) -> None:
    slim = slim_model("llama_gqa", 3)
    folder = save_pruned(slim, tiny_tokenizer, tmp_path / "pruned", {})
    assert main(["export", str(folder), "--to", "padded", "--out", str(tmp_path / "padded")]) == 0
    out = tmp_path / "padded"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not any(k.startswith("layer_") for k in config)
    assert not list(out.glob("*.py")) and (out / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only mode
    for f in out.iterdir():  # safetensors writes 0600; every export file is as readable as the others
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", CHILD_PADDED, str(out), str(tmp_path / "res.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    res = torch.load(tmp_path / "res.pt")
    assert res["cls"].startswith("transformers.models.llama")
    assert torch.allclose(res["logits"], logits(slim), atol=1e-5, rtol=0)
    # refused without --overwrite, replaced with it
    assert main(["export", str(folder), "--to", "padded", "--out", str(out)]) == 2
    assert main(["export", str(folder), "--to", "padded", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padded", "pruned", "res.pt"]


# ---- GGUF -------------------------------------------------------------------------------------------


def unpermute(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row order, by explicit indices: GGUF row ``h*d + 2i + j``
    holds HF row ``h*d + j*d/2 + i``."""
    out = np.empty_like(w)
    half = head_dim // 2
    for h in range(w.shape[0] // head_dim):
        for i in range(half):
            for j in range(2):
                out[h * head_dim + j * half + i] = w[h * head_dim + 2 * i + j]
    return out


def read_gguf(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: (np.array(t.data, dtype=np.float32), t.tensor_type.name, [int(x) for x in t.shape])
               for t in reader.tensors}
    return fields, tensors


def deci_forward(fields: dict, tensors: dict, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's ``deci`` graph in NumPy (float64), written from its semantics: RMS norms,
    *interleaved-pair* rope, per-layer head counts (query head j reads key/value head
    j // (heads/kv)), a layer with head_count 0 has no attention and no attention residual,
    a layer with feed_forward_length 0 is skipped entirely."""
    t = {k: v[0].astype(np.float64) for k, v in tensors.items()}
    eps = fields["deci.attention.layer_norm_rms_epsilon"]
    d = fields["deci.attention.key_length"]
    base = fields["deci.rope.freq_base"]

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x: np.ndarray) -> np.ndarray:  # x: (seq, heads, d)
        pos = np.arange(x.shape[0])[:, None]
        theta = pos * base ** (-np.arange(0, d, 2) / d)  # (seq, d/2)
        cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    results = []
    for row in ids:
        x = t["token_embd.weight"][row]
        seq = len(row)
        for i in range(fields["deci.block_count"]):
            heads = fields["deci.attention.head_count"][i]
            kv = fields["deci.attention.head_count_kv"][i]
            ff = fields["deci.feed_forward_length"][i]
            p = f"blk.{i}."
            cur = x
            if heads > 0:
                h = norm(x, t[p + "attn_norm.weight"])
                q = rope(lin(h, p + "attn_q").reshape(seq, heads, d))
                k = rope(lin(h, p + "attn_k").reshape(seq, kv, d))
                v = lin(h, p + "attn_v").reshape(seq, kv, d)
                att = np.empty((seq, heads, d))
                for j in range(heads):
                    g = j // (heads // kv)
                    s = q[:, j] @ k[:, g].T / np.sqrt(d) + np.triu(np.full((seq, seq), -np.inf), 1)
                    s = np.exp(s - s.max(-1, keepdims=True))
                    att[:, j] = (s / s.sum(-1, keepdims=True)) @ v[:, g]
                cur = lin(att.reshape(seq, heads * d), p + "attn_output") + x
            if ff == 0:
                continue  # llama.cpp drops the whole layer, attention included
            h = norm(cur, t[p + "ffn_norm.weight"])
            gate = lin(h, p + "ffn_gate")
            x = lin(gate / (1 + np.exp(-gate)) * lin(h, p + "ffn_up"), p + "ffn_down") + cur
        out_w = t.get("output.weight", t["token_embd.weight"])
        results.append(norm(x, t["output_norm.weight"]) @ out_w.T)
    return np.stack(results)


def gguf_plans(model: torch.nn.Module) -> dict[int, LayerPlan]:
    """Layer 0: no attention; layer 1: no attention *and* no MLP; layer 2: a few heads and
    channels; layer 3: no MLP."""
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    return {0: LayerPlan(kept_heads=[], kept_channels=list(range(0, 96, 2))),
            1: LayerPlan(kept_heads=[], kept_channels=[]),
            2: LayerPlan(kept_heads=[g * rep for g in range(model.config.num_key_value_heads)],
                         kept_channels=[1, 5, 9, 40, 77]),
            3: LayerPlan(kept_channels=[])}


@pytest.mark.parametrize("kind", list(MODELS))
def test_gguf_keys_shapes_and_rotary_permutation(kind: str, bpe_tokenizer, tmp_path: Path) -> None:
    cfg_cls, model_cls, kw = MODELS[kind]
    model = build_tiny(cfg_cls, model_cls, vocab_size=VOCAB, **kw)
    slim = slim_model(kind, plans=gguf_plans(model), vocab_size=VOCAB).requires_grad_(False)
    path = export(slim, bpe_tokenizer, "gguf", tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    fields, tensors = read_gguf(path)
    kv = kw["num_key_value_heads"]

    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 4 and fields["deci.embedding_length"] == 64
    # layer 0 gets the one zero head llama.cpp needs to know the head size; layers 1/3 a 1-wide zero MLP
    assert fields["deci.attention.head_count"] == [1, 0, kv, 8]
    assert fields["deci.attention.head_count_kv"] == [1, 0, kv, kv]
    assert fields["deci.feed_forward_length"] == [48, 1, 5, 1]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert fields["deci.vocab_size"] == VOCAB
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"] is False  # as the HF tokenizer: no BOS
    assert fields["tokenizer.ggml.tokens"] == bpe_tokenizer.convert_ids_to_tokens(list(range(VOCAB)))
    assert len(fields["tokenizer.ggml.merges"]) == VOCAB - 259
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(fields["tokenizer.ggml.token_type"][3:]) == {1}

    assert not any(n.startswith("blk.1.attn") for n in tensors)  # attention-free: no tensors at all
    assert ("output.weight" in tensors) == (not kw["tie_word_embeddings"])
    assert not tensors["blk.0.attn_q.weight"][0].any() and not tensors["blk.0.attn_output.weight"][0].any()
    assert not tensors["blk.3.ffn_down.weight"][0].any() and tensors["blk.3.ffn_gate.weight"][2] == [64, 1]
    layers = slim.model.layers
    for i in (2, 3):
        a = layers[i].self_attn
        q, qt, q_shape = tensors[f"blk.{i}.attn_q.weight"]
        assert qt == "F32" and q_shape == [64, a.q_proj.out_features]  # GGUF lists (in, out)
        assert np.array_equal(unpermute(q, 8), a.q_proj.weight.numpy())
        assert not np.array_equal(q, a.q_proj.weight.numpy())
        assert np.array_equal(unpermute(tensors[f"blk.{i}.attn_k.weight"][0], 8), a.k_proj.weight.numpy())
        assert np.array_equal(tensors[f"blk.{i}.attn_v.weight"][0], a.v_proj.weight.numpy())
        assert np.array_equal(tensors[f"blk.{i}.attn_output.weight"][0], a.o_proj.weight.numpy())
        if a.q_proj.bias is not None:
            assert np.array_equal(unpermute(tensors[f"blk.{i}.attn_q.bias"][0], 8), a.q_proj.bias.numpy())
            assert np.array_equal(unpermute(tensors[f"blk.{i}.attn_k.bias"][0], 8), a.k_proj.bias.numpy())
    m2 = layers[2].mlp
    assert np.array_equal(tensors["blk.2.ffn_down.weight"][0], m2.down_proj.weight.numpy())

    # llama.cpp's deci semantics, re-implemented, reproduce the PyTorch model
    ids = np.array([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    ref = logits(slim, torch.tensor(ids)).double().numpy()
    assert np.allclose(deci_forward(fields, tensors, ids), ref, atol=1e-4)


def test_permute_rope_matches_llamacpp_converter_formula() -> None:
    """llama.cpp's converter permutes with ``reshape(n_head, 2, rows // n_head // 2, ...)``."""
    w = torch.randn(5 * 8, 3)
    converter = w.reshape(5, 2, 8 // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(permute_rope(w, 8), converter)
    assert np.array_equal(unpermute(permute_rope(w, 8).numpy(), 8), w.numpy())


def test_gguf_half_precision_and_atomic_write(bpe_tokenizer, tmp_path: Path) -> None:
    slim = slim_model("llama", vocab_size=VOCAB).requires_grad_(False)
    path = export(slim, bpe_tokenizer, "gguf", tmp_path / "m.gguf", dtype="f16", tokenizer_pre="gpt-2")
    _, tensors = read_gguf(path)
    assert tensors["blk.1.attn_q.weight"][1] == "F16" and tensors["blk.1.attn_norm.weight"][1] == "F32"
    assert np.allclose(tensors["blk.1.ffn_up.weight"][0], slim.model.layers[1].mlp.up_proj.weight.numpy(), atol=1e-3)
    with pytest.raises(ConfigError, match="exists"):
        export(slim, bpe_tokenizer, "gguf", path)
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        export(slim, bpe_tokenizer, "gguf", tmp_path / "x.gguf", dtype="q3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.skipif(os.environ.get("SLIMGPT_LLAMACPP") != "1", reason="set SLIMGPT_LLAMACPP=1 (needs llama-cpp-python)")
@pytest.mark.parametrize("kind", list(MODELS))
def test_llamacpp_logits_match_pytorch(kind: str, bpe_tokenizer, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg_cls, model_cls, kw = MODELS[kind]
    model = build_tiny(cfg_cls, model_cls, vocab_size=VOCAB, **kw)
    slim = slim_model(kind, plans=gguf_plans(model), vocab_size=VOCAB)
    path = export(slim, bpe_tokenizer, "gguf", tmp_path / "m.gguf")
    # f32 KV cache (type 0): the default f16 cache alone costs ~1e-3 on these logits
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    ids = [5, 17, 99, 3, 64, 21, 7, 110, 42, 8]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    ref = logits(slim, torch.tensor([ids]))[0].numpy()
    assert np.allclose(got, ref, atol=1e-4), np.abs(got - ref).max()


# ---- ONNX -------------------------------------------------------------------------------------------


def test_onnx_matches_pytorch(tiny_tokenizer, tmp_path: Path, capfd) -> None:
    ort = pytest.importorskip("onnxruntime")
    slim = slim_model("qwen2", 1)
    out = export(slim, tiny_tokenizer, "onnx", tmp_path / "onnx")
    printed = capfd.readouterr()
    assert len((printed.out + printed.err).splitlines()) < 10  # the exporter's INFO flood stays out of the terminal
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    for ids in (IDS, torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))):
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        assert np.allclose(got, logits(slim, ids).numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLIMGPT_LLAMACPP") != "1", reason="set SLIMGPT_LLAMACPP=1 (needs llama-cpp-python)")
def test_llamacpp_real_model(tmp_path: Path) -> None:
    """SmolLM2-135M cut by hand (no calibration needed): layer 0 without attention, layer 5 without
    MLP, every layer with its own head and channel counts; llama.cpp must tokenise like the HF
    tokenizer and reproduce the logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from slimgpt.zoo import load_model

    model, tok = load_model("smollm2-135m")
    rng = random.Random(0)
    plans = {}
    for i in range(model.config.num_hidden_layers):
        groups = sorted(rng.sample(range(3), rng.randint(1, 3)))
        per = rng.randint(1, 3)
        heads = [] if i == 0 else [g * 3 + h for g in groups for h in range(per)]
        channels = [] if i == 5 else sorted(rng.sample(range(1536), rng.randint(100, 1500)))
        plans[i] = LayerPlan(kept_heads=heads, kept_channels=channels)
    zero_pruned(model, plans)
    slim = shrink_model(model, plans)
    slim.config._name_or_path = str(Path.home() / ".cache/slimgpt/models/smollm2-135m")
    path = export(slim, tok, "gguf", tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    text = "The 3 capitals: Paris, Berlin and Rome. It's 2024; prices rose 12.5%!"
    ids = tok(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    ref = logits(slim, torch.tensor([ids]))[0].numpy()
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_padded_refuses_models_with_added_output_biases(tiny_llama_gqa):
    """FLAP adds o_proj/down_proj biases; a stock folder would silently drop them."""
    from slimgpt.errors import ModelError
    from slimgpt.export.padded import stock_config
    from slimgpt.surgery import shrink_model

    slim = shrink_model(tiny_llama_gqa, {})
    slim.config.down_proj_bias = True
    with pytest.raises(ModelError, match="biases"):
        stock_config(slim)
