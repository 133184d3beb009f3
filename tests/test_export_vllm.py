"""``--to vllm`` / ``--to sglang``: the route rules (:mod:`slimgpt.serving`), the written configs
against the weights, the transformers-route folder reloaded without slimgpt (logits and cached
generation equal the slim model's), and the deci-route folder run by an independent re-implementation
of vLLM's ``DeciLMForCausalLM`` forward read off its config.json and safetensors.

vLLM itself (opt-in, its own environment, see ``scripts/setup_vllm.sh``):
``SLIMGPT_VLLM=/path/to/.venv-vllm/bin/python`` runs tiny models of both routes in vLLM and compares
greedy tokens and first-token log-probabilities with the slim model (float32); with
``SLIMGPT_SLOW=1`` as well, SmolLM2-135M cut by hand on both routes.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import build_tiny
from slimgpt.cli import main
from slimgpt.errors import ConfigError, ModelError
from slimgpt.export import export
from slimgpt.export.vllm import choose_route, ffn_mult, read_note
from slimgpt.io import save_pruned
from slimgpt.modeling import SLIM_CLASSES
from slimgpt.plan import LayerPlan
from slimgpt.serving import ROUTES, config_shapes, route_for
from slimgpt.surgery import layer_shapes, shrink_model
from test_io import load_without_slimgpt
from test_surgery import zero_pruned

IDS = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
MASK = torch.ones_like(IDS)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
GEMMA = dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
             sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0, pad_token_id=0)

# 8 query heads over 4 key/value heads (2 per group), FFN 96 (tests/conftest.py TINY)
HET = {0: LayerPlan(kept_heads=[0, 2, 4, 6]),                                  # 4 heads, 4 kv
       1: LayerPlan(kept_heads=[0, 1, 2, 3, 4, 5], kept_channels=list(range(0, 96, 3))),  # 6 heads, 3 kv
       2: LayerPlan(kept_heads=[2, 3], kept_channels=list(range(17))),         # 2 heads, 1 kv
       3: LayerPlan(kept_channels=[])}                                         # MLP removed
DECI = {0: LayerPlan(kept_heads=[0, 1, 2, 3]),                                 # 4 heads, 2 kv
        1: LayerPlan(kept_heads=[]),                                           # attention removed
        2: LayerPlan(kept_heads=[0, 2, 4, 6], kept_channels=[]),               # 4 heads, 4 kv, MLP removed
        3: LayerPlan(kept_heads=[4, 5, 6, 7], kept_channels=list(range(1, 96, 2)))}


def tiny_slim(kind: str, plans: dict, seed: int = 0, **overrides) -> torch.nn.Module:
    """A pruned tiny model (tests/conftest.py sizes, 4 key/value heads), cut to ``plans``."""
    over = {"num_key_value_heads": 4, "tie_word_embeddings": False, **(GEMMA if kind == "gemma3" else {}), **overrides}
    model = build_tiny(*FAMILIES[kind], seed=seed, **over)
    if kind == "gemma3":  # stock init makes every Gemma norm the identity, which would hide a misplaced one
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    zero_pruned(model, plans)
    return shrink_model(model, plans)


def with_output_biases(slim: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``slim`` with o_proj and down_proj biases in every layer (what FLAP's compensation adds)."""
    fields = {k: v for k, v in slim.config.to_dict().items()
              if k not in ("model_type", "per_layer_config", "allow_global_per_layer_attribute_access")}
    config_cls, model_cls = SLIM_CLASSES[slim.config.model_type]
    model = model_cls(config_cls(**{**fields, "o_proj_bias": True, "down_proj_bias": True})).eval()
    missing, unexpected = model.load_state_dict(slim.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(("o_proj.bias", "down_proj.bias")) for k in missing)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in missing:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def shapes_of(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    return [(s["heads"], s["kv_heads"], s["channels"]) for s in layer_shapes(model)]


# ---- route rules ----------------------------------------------------------------------------------


def test_route_choice_and_each_rule() -> None:
    full = [(8, 4, 96)] * 4
    assert route_for("vllm", full).route == "transformers"  # the first route serving the shapes
    assert route_for("vllm", [(4, 4, 96), (6, 3, 0), (2, 1, 17), (8, 4, 5)]).route == "transformers"
    assert route_for("vllm", [(4, 2, 96), (0, 0, 96), (4, 4, 0), (4, 1, 7)]).route == "deci"
    assert route_for("sglang", [(4, 2, 512), (0, 0, 256), (4, 4, 0)]).route == "deci"
    assert route_for("vllm", [(0, 0, 0), (4, 2, 96)]).route == "deci"  # a wholly removed first layer is fine
    refusals = [
        # attention removed (transformers) and query heads vary (deci): the first offending layer of each
        ("vllm", [(4, 2, 96), (0, 0, 96), (6, 3, 96)], {},
         r"transformers route: layer 1: its attention block is removed; deci route: layer 2: 6 query heads where "
         r"layer 0 has 4 .*; prune it again with --target vllm"),
        ("vllm", [(0, 0, 96), (4, 2, 96)], {}, r"deci route: layer 0: its MLP comes before any attention block"),
        ("vllm", [(0, 0, 96)] * 2, {}, r"deci route: no layer keeps attention"),
        ("vllm", [(6, 4, 96)], {}, r"layer 0: 6 query heads cannot share 4 key/value heads evenly"),
        ("sglang", [(4, 2, 512), (4, 2, 300)], {}, r"layer 1: FFN width 300 is not a multiple of 256\); prune it again "
                                                    r"with --target sglang"),
        ("vllm", [(4, 2, 96), (0, 0, 96)], {"family": "gemma3"},
         r"deci route: Gemma 3 has no mapping onto it\); prune it again with --target vllm"),
        ("sglang", [(4, 2, 256)], {"family": "gemma3"}, r"Gemma 3 has no mapping onto it\); export it --to padded"),
        ("sglang", [(4, 2, 256)], {"family": "qwen2", "sliding": True}, r"it has no sliding-window layers"),
        ("tensorrt", [(4, 2, 256)], {}, r"unknown serving target 'tensorrt'"),
    ]
    for target, shapes, kw, message in refusals:
        with pytest.raises(ConfigError, match=message) as err:
            route_for(target, shapes, **kw)
        assert "\n" not in str(err.value)
    assert [c.route for c in ROUTES["vllm"]] == ["transformers", "deci"]


def test_config_shapes_read_the_slim_lists_or_the_stock_sizes() -> None:
    stock = {"model_type": "qwen2", "num_hidden_layers": 2, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "layer_types": ["full_attention"] * 2}
    assert config_shapes(stock) == ([(14, 2, 4864)] * 2, "qwen2", False)
    slim = {**stock, "model_type": "slimgpt_gemma3", "layer_types": ["sliding_attention", "full_attention"],
            "layer_num_attention_heads": [0, 6], "layer_num_key_value_heads": [0, 1],
            "layer_intermediate_size": [100, 0]}
    assert config_shapes(slim) == ([(0, 0, 100), (6, 1, 0)], "gemma3", True)
    assert config_shapes({"model_type": "mistral"}) is None


def test_ffn_mult_gives_back_the_width_in_deci_readers() -> None:
    def vllm_width(mult: float, hidden: int) -> int:  # vLLM's _ffn_mult_to_intermediate_size, rewritten
        n = int(2 * mult * hidden / 3)
        return n if n % 256 == 0 else n + 256 - n % 256

    for hidden in (576, 896, 2048, 4096, 8192, 5120):
        for width in range(256, 8 * hidden, 256):
            assert vllm_width(ffn_mult(width, hidden), hidden) == width
    with pytest.raises(ModelError, match="no exact ffn_mult"):
        ffn_mult(300, 576)


# ---- transformers route ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_transformers_route_folder(kind: str, tiny_tokenizer, tmp_path: Path) -> None:
    """Per-layer sizes in config.json equal the weights'; a removed MLP becomes one zero channel;
    the folder reloads without slimgpt (trust_remote_code) with the slim model's logits and tokens,
    and its per_layer_config gives each layer's own head counts (what vLLM reads)."""
    slim = with_output_biases(tiny_slim(kind, HET)) if kind == "qwen2" else tiny_slim(kind, HET)
    shapes = shapes_of(slim)
    assert choose_route(slim).route == "transformers"
    out = export(slim, tiny_tokenizer, "vllm", tmp_path / "v")
    note = read_note(out)
    assert note["route"] == "transformers" and note["layer_shapes"] == [list(s) for s in shapes]
    assert note["serve"] == f"vllm serve {out} --trust-remote-code --model-impl transformers"
    config = json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    d = config["head_dim"]
    for i, (h, kv, c) in enumerate(shapes):
        p = f"model.layers.{i}."
        assert weights[p + "self_attn.q_proj.weight"].shape[0] == h * d == config["layer_num_attention_heads"][i] * d
        assert weights[p + "self_attn.k_proj.weight"].shape[0] == kv * d == config["layer_num_key_value_heads"][i] * d
        assert weights[p + "mlp.up_proj.weight"].shape[0] == max(c, 1) == config["layer_intermediate_size"][i]
        per_layer = config["per_layer_config"].get(str(i), {})
        assert per_layer.get("num_attention_heads", config["num_attention_heads"]) == h
        assert per_layer.get("num_key_value_heads", config["num_key_value_heads"]) == kv
    assert not weights["model.layers.3.mlp.down_proj.weight"].any()  # the removed MLP's one channel is zero
    assert config["auto_map"]["AutoModel"].startswith("modeling_slimgpt.Slim")
    kw = dict(attention_mask=MASK, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    if kind == "llama":  # in a process without slimgpt, through the folder's own code (a few seconds)
        res = load_without_slimgpt(out, IDS, MASK, tmp_path)
    else:
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        res = {"logits": logits(again), "tokens": again.generate(IDS, **kw)}
    assert torch.allclose(res["logits"], logits(slim), atol=1e-5, rtol=0)
    assert torch.equal(res["tokens"], slim.generate(IDS, **kw))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)  # what vLLM sizes each layer's attention from
    assert [(c.num_attention_heads, c.num_key_value_heads) for c in cfg.per_layer_config] == [s[:2] for s in shapes]


def test_slim_folder_is_the_transformers_route_folder(tiny_tokenizer, tmp_path: Path) -> None:
    """One format: the pruned folder itself carries what vLLM's Transformers backend needs (the
    per_layer_config mirror, auto_map's AutoModel, the stock attention forward in layers with heads,
    which vLLM finds by reading its source)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    slim = tiny_slim("llama", {**HET, 3: LayerPlan(kept_heads=[])})
    out = save_pruned(slim, tiny_tokenizer, tmp_path / "p", {})
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] == {"0": {"num_attention_heads": 4},
                                          "1": {"intermediate_size": 32, "num_attention_heads": 6,
                                                "num_key_value_heads": 3},
                                          "2": {"intermediate_size": 17, "num_attention_heads": 2,
                                                "num_key_value_heads": 1},
                                          "3": {"num_attention_heads": 0, "num_key_value_heads": 0}}
    assert config["allow_global_per_layer_attribute_access"] is True
    assert config["auto_map"]["AutoModel"] == "modeling_slimgpt.SlimLlamaModel"
    attns = [layer.self_attn for layer in slim.model.layers]
    assert all(type(a).forward is LlamaAttention.forward for a in attns[:3])
    assert type(attns[3]).forward is not LlamaAttention.forward  # the 0-head layer's own forward
    assert (slim.config.num_attention_heads, slim.config.per_layer_config[1].num_attention_heads) == (8, 6)


# ---- deci route -----------------------------------------------------------------------------------


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def deci_forward(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """vLLM's ``DeciLMForCausalLM`` forward, written from its documented semantics and read off the
    folder alone: per layer, unless ``no_op``, a Llama attention block with
    ``num_attention_heads // n_heads_in_group`` key/value heads (q/k/v biases if ``qkv_bias``, o bias
    if ``attention_bias``) and a SiLU-gated MLP of ``intermediate_size`` (or ``ffn_mult``) channels."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    hidden, heads, d, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"]
    seq = ids.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x: torch.Tensor) -> torch.Tensor:  # (b, h, s, d), rotate-half (NeoX) layout
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            kv = heads // block["attention"]["n_heads_in_group"]
            h = rms(x, w[p + "input_layernorm.weight"], eps)
            b = h.shape[0]
            q = rope(lin(h, p + "self_attn.q_proj").view(b, seq, heads, d).transpose(1, 2))
            k = rope(lin(h, p + "self_attn.k_proj").view(b, seq, kv, d).transpose(1, 2))
            v = lin(h, p + "self_attn.v_proj").view(b, seq, kv, d).transpose(1, 2)
            k, v = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1) @ v
            x = x + lin(att.transpose(1, 2).reshape(b, seq, heads * d), p + "self_attn.o_proj")
        if not block["ffn"]["no_op"]:
            h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    assert head.shape == (cfg["vocab_size"], hidden)
    return x @ head.T


@pytest.mark.parametrize("kind,biases", [("llama", False), ("qwen2", False), ("llama", True)])
def test_deci_route_folder(kind: str, biases: bool, tiny_tokenizer, tmp_path: Path) -> None:
    """block_configs equal the weights' shapes, removed blocks' tensors are left out, and the
    independent DeciLM forward on the folder gives the slim model's logits."""
    plans = DECI if not biases else {**DECI, 1: LayerPlan(kept_heads=[2, 3, 6, 7])}  # FLAP: no removed attention
    slim = tiny_slim(kind, plans, seed=3, tie_word_embeddings=kind == "qwen2")
    if biases:
        slim = with_output_biases(slim)
    shapes = shapes_of(slim)
    out = export(slim, tiny_tokenizer, "vllm", tmp_path / "d", route="deci" if biases else None)
    assert read_note(out)["route"] == "deci" and read_note(out)["serve"] == f"vllm serve {out} --trust-remote-code"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (out / "configuration_decilm.py").is_file() and not (out / "modeling_slimgpt.py").exists()
    assert config["qkv_bias"] == (kind == "qwen2") and config["attention_bias"] == biases
    weights = load_file(out / "model.safetensors")
    for i, ((h, kv, c), block) in enumerate(zip(shapes, config["block_configs"])):
        p = f"model.layers.{i}."
        assert block["attention"]["no_op"] == (h == 0)
        assert (p + "input_layernorm.weight" in weights) == (h > 0)
        if h:
            assert h == config["num_attention_heads"] and kv == h // block["attention"]["n_heads_in_group"]
            assert weights[p + "self_attn.k_proj.weight"].shape[0] == kv * config["head_dim"]
        else:
            assert not any(k.startswith(p + "self_attn.") for k in weights)
        kept_c = c or (1 if biases else 0)  # FLAP's removed MLP still adds its bias: one zero channel holds it
        assert block["ffn"]["no_op"] == (kept_c == 0)
        assert block["ffn"].get("intermediate_size", 0) == kept_c and "ffn_mult" not in block["ffn"]
        assert (p + "mlp.up_proj.weight" in weights) == (kept_c > 0)
    assert torch.allclose(deci_forward(out, IDS), logits(slim), atol=1e-5, rtol=0)


def test_deci_config_class_reads_blocks_as_attributes(tmp_path: Path) -> None:
    from transformers import AutoConfig

    slim = tiny_slim("llama", {1: LayerPlan(kept_heads=[], kept_channels=list(range(256))),
                               2: LayerPlan(kept_channels=[])}, intermediate_size=512)
    out = export(slim, None, "sglang", tmp_path / "s")
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(cfg).__name__ == "DeciLMConfig" and cfg.model_type == "nemotron-nas"
    blocks = cfg.block_configs
    assert [b.attention.no_op for b in blocks] == [False, True, False, False]
    assert [b.ffn.no_op for b in blocks] == [False, False, True, False]
    assert blocks[0].attention.n_heads_in_group == 2 and not hasattr(blocks[0].ffn, "intermediate_size")
    assert [round(2 * b.ffn.ffn_mult * 64 / 3) for b in blocks if not b.ffn.no_op] == [512, 256, 512]
    assert json.loads(cfg.to_json_string())["block_configs"][1]["attention"] == {"no_op": True}
    assert torch.allclose(deci_forward_sglang(out), logits(slim), atol=1e-5, rtol=0)
    assert "not run here" in read_note(out)["note"]


def deci_forward_sglang(folder: Path) -> torch.Tensor:
    """:func:`deci_forward` on an ``ffn_mult`` folder: widths read back as DeciLM readers do."""
    cfg = json.loads((folder / "config.json").read_text())
    for block in cfg["block_configs"]:
        if "ffn_mult" in block["ffn"]:
            n = int(2 * block["ffn"].pop("ffn_mult") * cfg["hidden_size"] / 3)
            block["ffn"]["intermediate_size"] = n + (-n) % 256
    copy = folder.parent / (folder.name + "-widths")
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps(cfg))
    (copy / "model.safetensors").symlink_to(folder / "model.safetensors")
    return deci_forward(copy, IDS)


def test_refusals_name_the_layer_and_the_prune_option(tmp_path: Path) -> None:
    both = tiny_slim("llama", {1: LayerPlan(kept_heads=[]), 2: LayerPlan(kept_heads=[0, 1])})
    with pytest.raises(ConfigError, match=r"transformers route: layer 1: .*; deci route: layer 2: .*--target vllm$"):
        export(both, None, "vllm", tmp_path / "x")
    flap = with_output_biases(tiny_slim("llama", {1: LayerPlan(kept_heads=[])}))
    with pytest.raises(ConfigError, match=r"layer 1: its removed attention block still adds o_proj's bias"):
        export(flap, None, "vllm", tmp_path / "x")
    gemma = tiny_slim("gemma3", {1: LayerPlan(kept_heads=[])})
    with pytest.raises(ConfigError, match=r"deci route: Gemma 3 has no mapping onto it"):
        export(gemma, None, "vllm", tmp_path / "x")
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_cli_export_vllm_prints_the_serve_line_and_refuses_early(tiny_tokenizer, tmp_path: Path, capsys) -> None:
    slim = tiny_slim("llama", HET)
    folder = save_pruned(slim, tiny_tokenizer, tmp_path / "pruned", {})
    assert main(["export", str(folder), "--to", "vllm", "--out", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {tmp_path / 'v'} --trust-remote-code --model-impl transformers" in printed
    assert "model_impl=\"transformers\"" in printed and "route: transformers" in printed
    assert "itself is served" not in printed  # its layer 3 has no MLP: only the export's zero channel serves it
    whole = save_pruned(tiny_slim("llama", {0: LayerPlan(kept_heads=[0, 2, 4, 6])}), tiny_tokenizer,
                        tmp_path / "whole", {})
    assert main(["export", str(whole), "--to", "vllm", "--out", str(tmp_path / "v2")]) == 0
    assert f"itself is served the same way: vllm serve {whole} --trust-remote-code" in capsys.readouterr().out
    assert main(["export", str(folder), "--to", "vllm", "--route", "deci", "--out", str(tmp_path / "d")]) == 2
    assert "deci route: layer 1: 6 query heads where layer 0 has 4" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "gguf", "--route", "deci", "--out", str(tmp_path / "g")]) == 2
    assert "--route picks one of vLLM's routes" in capsys.readouterr().err
    bad = save_pruned(tiny_slim("llama", {1: LayerPlan(kept_heads=[]), 2: LayerPlan(kept_heads=[0, 1])}),
                      tiny_tokenizer, tmp_path / "bad", {})
    (bad / "model.safetensors").write_bytes(b"")  # refused from config.json alone, before the weights are read
    assert main(["export", str(bad), "--to", "vllm", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "layer 1" in err and "--target vllm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_dense_model_exports_at_full_size(tiny_llama_gqa, tmp_path: Path) -> None:
    ref = logits(tiny_llama_gqa)
    out = export(tiny_llama_gqa, None, "vllm", tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slimgpt_llama" and not config.get("per_layer_config")  # homogeneous
    assert read_note(out)["layer_shapes"] == [[8, 2, 96]] * 4
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out)), ref, atol=1e-5, rtol=0)


# ---- vLLM itself (opt-in) -----------------------------------------------------------------------------

VLLM_PYTHON = os.environ.get("SLIMGPT_VLLM", "")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="set SLIMGPT_VLLM=/path/to/vllm-venv/bin/python "
                                                        "(scripts/setup_vllm.sh builds one)")


def run_in_vllm(models: dict[str, Path], prompts: list[list[int]], max_tokens: int, tmp_path: Path,
                impl: dict[str, str]) -> dict:
    """Greedy tokens and first-token log-probs of each folder in vLLM (float32, CPU), one engine at a time."""
    spec = {"models": {n: {"path": str(p), "model_impl": impl[n]} for n, p in models.items()},
            "dtype": "float32", "max_model_len": 256, "enforce_eager": True, "check": {"prompts": prompts, "max_tokens": max_tokens,
                                                                 "logprobs": 5}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    runner = Path(__file__).resolve().parents[1] / "src" / "slimgpt" / "export" / "vllm_run.py"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)
    subprocess.run([VLLM_PYTHON, str(runner), str(tmp_path / "spec.json"), str(tmp_path / "res.json")],
                   check=True, env=env, cwd=tmp_path, timeout=3600)
    return json.loads((tmp_path / "res.json").read_text())["models"]


def reference(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            lp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            rows.append({"tokens": out[0, len(p):].tolist(), "logprobs": lp})
    return rows


def assert_same(got: dict, ref: list[dict], name: str) -> None:
    assert "error" not in got, f"{name}: {got.get('error')}"
    for i, (g, r) in enumerate(zip(got["check"], ref)):
        assert g["tokens"] == r["tokens"], f"{name}, prompt {i}: vLLM {g['tokens']} != slimgpt {r['tokens']}"
        for token, lp in g["first_logprobs"].items():
            assert abs(lp - float(r["logprobs"][int(token)])) < 1e-3, (name, i, token)


@needs_vllm
def test_vllm_serves_both_routes(tmp_path: Path) -> None:
    """Tiny models (head_dim 32: vLLM's CPU attention sizes) on every route vLLM serves, with greedy
    tokens and first-token log-probs equal to the slim model's (float32)."""
    kw = dict(hidden_size=256, head_dim=32, intermediate_size=512, vocab_size=300)
    het = {i: LayerPlan(kept_heads=p.kept_heads, kept_channels=p.kept_channels) for i, p in HET.items()}
    models = {
        "llama_transformers": tiny_slim("llama", het, **kw),
        "qwen2_transformers_biases": with_output_biases(tiny_slim("qwen2", het, **kw)),
        "gemma3_transformers": tiny_slim("gemma3", {0: LayerPlan(kept_heads=[0, 1, 4, 5]),
                                                    2: LayerPlan(kept_heads=[6], kept_channels=list(range(50)))}, **kw),
        "llama_deci": tiny_slim("llama", DECI, **kw),
        "qwen2_deci": tiny_slim("qwen2", DECI, tie_word_embeddings=True, **kw),
        "llama_deci_biases": with_output_biases(tiny_slim("llama", {**DECI, 1: LayerPlan(kept_heads=[2, 3, 6, 7])},
                                                          **kw)),
    }
    routes = {"llama_deci_biases": "deci"}  # uniform heads and every attention kept: both routes serve it
    sglang = tiny_slim("llama", {1: LayerPlan(kept_heads=[], kept_channels=list(range(256))),
                                 2: LayerPlan(kept_channels=[])}, **kw)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (5, 12, 23, 40)]
    folders, impl = {}, {}
    for name, model in models.items():
        folders[name] = export(model, None, "vllm", tmp_path / name, route=routes.get(name))
        impl[name] = "transformers" if read_note(folders[name])["route"] == "transformers" else "auto"
        assert read_note(folders[name])["route"] == name.split("_")[1]
    folders["llama_sglang"] = export(sglang, None, "sglang", tmp_path / "llama_sglang")  # vLLM reads ffn_mult too
    impl["llama_sglang"] = "auto"
    models["llama_sglang"] = sglang
    got = run_in_vllm(folders, prompts, 32, tmp_path, impl)
    for name, model in models.items():
        assert_same(got[name], reference(model, prompts, 32), name)


@needs_vllm
@pytest.mark.slow
def test_vllm_serves_smollm2_cut_by_hand(tmp_path: Path) -> None:
    """SmolLM2-135M cut by hand (no calibration): per-layer query heads and FFN widths (transformers
    route), and uniform heads with removed attention and MLP blocks (deci route)."""
    from slimgpt.zoo import load_model

    rng = random.Random(0)
    het, deci = {}, {}
    for i in range(30):
        groups, per = sorted(rng.sample(range(3), rng.randint(1, 3))), rng.randint(1, 3)
        het[i] = LayerPlan(kept_heads=[g * 3 + h for g in groups for h in range(per)],
                           kept_channels=sorted(rng.sample(range(1536), rng.randint(100, 1500))))
        deci[i] = LayerPlan(kept_heads=[] if i in (7, 19) else [g * 3 + h for g in range(3) for h in range(2)],
                            kept_channels=[] if i == 25 else sorted(rng.sample(range(1536), rng.randint(100, 1500))))
    models, folders = {}, {}
    for name, plans in (("transformers", het), ("deci", deci)):
        model, tok = load_model("smollm2-135m")
        zero_pruned(model, plans)
        models[name] = shrink_model(model, plans)
        folders[name] = export(models[name], tok, "vllm", tmp_path / name)
        assert read_note(folders[name])["route"] == name
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "Pruning large language models"]
    prompts = [tok(t)["input_ids"] for t in texts]
    got = run_in_vllm(folders, prompts, 32, tmp_path, {"transformers": "transformers", "deci": "auto"})
    for name, model in models.items():
        assert_same(got[name], reference(model, prompts, 32), name)
