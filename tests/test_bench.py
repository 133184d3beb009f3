"""Generation benchmark on tiny random models: structure and exact counts, never timings' values
(two cores shared with other jobs make any speed assertion flaky)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt.errors import ConfigError
from slimgpt.evaluation import bench


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
    dense, pruned = _model(96), _model(48, kv_heads=1)
    prompt, new = 8, 5
    result = bench.benchmark_generation(
        [("dense", dense, tok), ("pruned", pruned, tok)],
        prompt_tokens=prompt,
        new_tokens=new,
        repeats=1,
        warmup=0,
    )
    assert result["reference"] == "dense"
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (prompt, new, 1)
    assert result["torch_threads"] == torch.get_num_threads()
    for entry, model in zip(result["models"], (dense, pruned)):
        assert entry["params"] == sum(p.numel() for p in model.parameters())
        assert entry["device"] == "cpu" and entry["dtype"] == "float32"
        assert entry["prefill_ms"] > 0 and entry["decode_ms_per_token"] > 0
        assert entry["decode_tokens_per_s"] > 0 and entry["generate_tokens_per_s"] > 0
        assert entry["peak_memory_bytes"] is None  # CPU: documented as not measurable
        assert entry["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
            b.numel() * b.element_size() for b in model.buffers()
        )
        # The cache holds every position but the last generated token (never fed back).
        cfg = model.config
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (prompt + new - 1) * 4
        assert entry["kv_cache_bytes"] == kv
        assert len(entry["runs"]) == 1
        assert set(entry["speedup"]) == {
            "prefill",
            "decode",
            "generate",
            "params_ratio",
            "weight_bytes_ratio",
        }
    assert result["models"][0]["speedup"]["decode"] == 1.0  # the reference against itself, same numbers
    assert result["models"][1]["speedup"]["params_ratio"] < 1.0
    table = bench.format_table(result)
    assert "| dense |" in table and "| pruned |" in table and "Memory:" in table


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
