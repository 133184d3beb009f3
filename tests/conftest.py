"""Tiny random models shared by the tests: hidden 64, 4 layers, 8 query heads of size 8, FFN 96,
vocabulary 128, fp32, eval mode, seeded (the same weights on every call).

Weights use std 0.1 (the stock 0.02 makes every logit nearly equal, which hides wrong outputs)
and biases are random (stock init zeroes them, which would hide mishandled biases).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
            head_dim=8, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def build_tiny(config_cls: type, model_cls: type, seed: int = 0, **overrides) -> PreTrainedModel:
    """A fresh tiny model; same seed, same weights, without disturbing the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config_cls(**{**TINY, **overrides}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    return model.eval()


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's γ_n = n·u / (1 − n·u), u the unit roundoff of ``dtype``: a sum or dot product of ``n``
    terms computed in ``dtype``, in any order and blocking, is within γ_n · Σ|terms| of the exact one.
    Tolerances of float comparisons are derived from it (what a CPU's BLAS or a thread count may
    change is the order, never the bound)."""
    u = torch.finfo(dtype).eps / 2
    assert n * u < 1
    return n * u / (1 - n * u)


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    """Llama, 4 key/value heads (2 query heads each), tied embeddings."""
    return build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=4, tie_word_embeddings=True)


@pytest.fixture
def tiny_llama_gqa() -> PreTrainedModel:
    """Llama, 2 key/value heads (4 query heads each), untied embeddings."""
    return build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture
def tiny_qwen2() -> PreTrainedModel:
    """Qwen2, 2 key/value heads, q/k/v biases, untied embeddings."""
    return build_tiny(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture
def tiny_tokenizer():
    """A word-level tokenizer built offline: "<unk>", "<s>", "</s>", then "t3" … "t127" (word ``tN``
    is token N)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.slow`` tests load real models (tens of seconds each on 2 cores): they run
    only when ``SLIMGPT_SLOW=1``."""
    import os

    if os.environ.get("SLIMGPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SLIMGPT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def calib_file(tmp_path) -> str:
    """A calibration text for ``tiny_tokenizer``: 30 paragraphs of 200 random words ``tN``."""
    import random

    rnd = random.Random(0)
    f = tmp_path / "calib.txt"
    f.write_text("\n\n".join(" ".join(f"t{rnd.randrange(3, 128)}" for _ in range(200)) for _ in range(30)))
    return str(f)
