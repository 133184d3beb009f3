"""Generation benchmark on tiny random models: structure, exact counts, and that every reported
time and speed-up is computed from the measured runs; never timings' values (two cores shared
with other jobs make any speed assertion flaky)."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt.errors import ConfigError
from slimgpt.evaluation import bench
from slimgpt.plan import LayerPlan
from slimgpt.surgery import shrink_model


def _tokenizer() -> PreTrainedTokenizerFast:
    # Every English word of the benchmark prompt maps to <unk>: one token per word is all we need.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model(intermediate: int, kv_heads: int = 2) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            head_dim=8,
            max_position_embeddings=64,
            eos_token_id=2,
        )
        return LlamaForCausalLM(cfg).eval()


def test_benchmark_structure_and_counts() -> None:
    tok = _tokenizer()
    dense = _model(96)
    # a pruned copy made by the real surgery: layer 0 keeps one key/value group and half its
    # channels, layer 1 keeps every other channel
    plans = {0: LayerPlan(kept_heads=[0, 1], kept_channels=list(range(48))),
             1: LayerPlan(kept_channels=list(range(0, 96, 2)))}
    pruned = shrink_model(copy.deepcopy(dense), plans)
    prompt, new = 8, 5
    result = bench.benchmark_generation(
        [("dense", dense, tok), ("pruned", pruned, tok)],
        prompt_tokens=prompt,
        new_tokens=new,
        repeats=3,
        warmup=0,
    )
    assert result["reference"] == "dense"
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (prompt, new, 3)
    assert result["torch_threads"] == torch.get_num_threads()
    for entry, model in zip(result["models"], (dense, pruned)):
        assert entry["params"] == sum(p.numel() for p in model.parameters())
        assert entry["device"] == "cpu" and entry["dtype"] == "float32"
        assert entry["peak_memory_bytes"] is None  # CPU: documented as not measurable
        assert entry["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers()
        )
        # The cache holds every position but the last generated token (never fed back), per
        # layer at that layer's own key/value head count.
        kv_heads = [lay.self_attn.k_proj.out_features // 8 for lay in model.model.layers]
        assert entry["kv_cache_bytes"] == 2 * sum(kv_heads) * 8 * (prompt + new - 1) * 4
        # every reported time is the median of the runs it kept, and the runs are consistent
        runs = entry["runs"]
        assert len(runs) == 3
        for r in runs:
            assert 0 < r["first_token_s"] <= r["generate_s"] and 0 < r["decode_s"] < r["generate_s"]
        med = {k: statistics.median(r[k] for r in runs) for k in ("prefill_s", "decode_s", "generate_s")}
        assert entry["prefill_ms"] == pytest.approx(1000 * med["prefill_s"], rel=1e-12)
        assert entry["decode_ms_per_token"] == pytest.approx(1000 * med["decode_s"] / (new - 1), rel=1e-12)
        assert entry["decode_tokens_per_s"] == pytest.approx((new - 1) / med["decode_s"], rel=1e-12)
        assert entry["generate_tokens_per_s"] == pytest.approx(new / med["generate_s"], rel=1e-12)
    d, p = result["models"]
    assert p["params"] < d["params"] and p["weight_bytes"] < d["weight_bytes"]
    assert p["kv_cache_bytes"] < d["kv_cache_bytes"]  # layer 0 lost a key/value head
    # speed-ups are ratios of the two models' measured times (> 1: the pruned one is faster)
    assert p["speedup"]["prefill"] == pytest.approx(d["prefill_ms"] / p["prefill_ms"], rel=1e-12)
    assert p["speedup"]["decode"] == pytest.approx(d["decode_ms_per_token"] / p["decode_ms_per_token"], rel=1e-12)
    assert p["speedup"]["generate"] == pytest.approx(p["generate_tokens_per_s"] / d["generate_tokens_per_s"], rel=1e-12)
    assert p["speedup"]["params_ratio"] == p["params"] / d["params"]
    assert p["speedup"]["weight_bytes_ratio"] == p["weight_bytes"] / d["weight_bytes"]
    table = bench.format_table(result)
    assert "| dense |" in table and "| pruned |" in table and "Memory:" in table
    assert f"| {p['speedup']['decode']:.2f} |" in table


def test_benchmark_rejects_bad_settings() -> None:
    tok, model = _tokenizer(), _model(48)
    with pytest.raises(ConfigError):
        bench.benchmark_generation([("m", model, tok)], new_tokens=1)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        bench.benchmark_generation([("m", model, tok)], prompt_tokens=40, new_tokens=40)
    with pytest.raises(ConfigError):
        bench.benchmark_generation([("m", model, tok), ("m", model, tok)], new_tokens=2)
    with pytest.raises(ConfigError):
        bench.benchmark_generation([("m", model, tok)], new_tokens=2, num_threads=0)
    assert bench.TABLE4_NEW_TOKENS == 512


def test_num_threads_applies_to_the_run_only() -> None:
    before = torch.get_num_threads()
    result = bench.benchmark_generation(
        [("m", _model(48), _tokenizer())], prompt_tokens=4, new_tokens=2, repeats=1, warmup=0, num_threads=1
    )
    assert result["torch_threads"] == 1
    assert torch.get_num_threads() == before
