"""shrink_model: the shrunk model must compute exactly what the zeroed full-size model computes."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from slimgpt.errors import ConfigError
from slimgpt.plan import LayerPlan
from slimgpt.surgery import layer_shapes, parameter_count, shrink_model

IDS = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def zero_pruned(model: torch.nn.Module, plans: dict[int, LayerPlan]) -> None:
    """What a pruning method leaves behind: o_proj columns of removed heads and down_proj columns of
    removed channels are zero (removed key/value heads are then read by nobody)."""
    with torch.no_grad():
        for i, plan in plans.items():
            layer = model.model.layers[i]
            d = layer.self_attn.head_dim
            if plan.kept_heads is not None:
                for h in set(range(layer.self_attn.o_proj.in_features // d)) - set(plan.kept_heads):
                    layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            if plan.kept_channels is not None:
                removed = sorted(set(range(layer.mlp.down_proj.in_features)) - set(plan.kept_channels))
                layer.mlp.down_proj.weight[:, removed] = 0


def random_plans(rng: random.Random, model: torch.nn.Module) -> dict[int, LayerPlan]:
    """Layer 0 loses every head (so the cache placeholder sits in layer 0), layer 1 loses the same
    number of heads in every key/value group, layer 2 loses whole key/value groups (keeping
    ``kv - 1``), layer 3 loses every channel; channels of layers 0 and 2 are random subsets."""
    cfg = model.config
    heads, kv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    rep = heads // kv

    def pick(groups: list[int], per_group: int) -> list[int]:
        return sorted(g * rep + h for g in groups for h in rng.sample(range(rep), per_group))

    return {
        0: LayerPlan(kept_heads=[], kept_channels=sorted(rng.sample(range(ffn), rng.randint(1, ffn - 1)))),
        1: LayerPlan(kept_heads=pick(list(range(kv)), rng.randint(1, rep - 1))),
        2: LayerPlan(kept_heads=pick(sorted(rng.sample(range(kv), kv - 1)), rng.randint(1, rep)),
                     kept_channels=sorted(rng.sample(range(ffn), 7))),
        3: LayerPlan(kept_channels=[]),
    }


def expected_params(model: torch.nn.Module, shapes: list[dict[str, int]]) -> int:
    """Counted by hand from the architecture, independent of slimgpt's own accounting."""
    cfg = model.config
    h, d = cfg.hidden_size, cfg.head_dim
    qkv_bias = cfg.model_type.endswith("qwen2")
    total = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h  # embeddings, lm_head, norm
    for s in shapes:
        total += 2 * h  # two RMSNorms
        total += s["heads"] * d * h * 2 + s["kv_heads"] * d * h * 2  # q, o, k, v
        total += (s["heads"] + 2 * s["kv_heads"]) * d if qkv_bias else 0
        total += s["channels"] * h * 3  # gate, up, down
    return total


MODELS = ["tiny_llama", "tiny_llama_gqa", "tiny_qwen2"]


@pytest.mark.parametrize("name", MODELS)
def test_keep_everything_is_identity(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    ref = logits(model)
    full = {i: LayerPlan(kept_heads=list(range(8)), kept_channels=list(range(96))) for i in range(4)}
    slim = shrink_model(model, full)
    assert type(slim).__name__.startswith("Slim")
    assert torch.equal(logits(slim), ref)
    assert torch.equal(logits(shrink_model(slim, {})), ref)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrunk_equals_zeroed_full_model(name: str, seed: int, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    plans = random_plans(random.Random(seed), model)
    dense = logits(model)
    zero_pruned(model, plans)
    ref = logits(model)
    slim = shrink_model(copy.deepcopy(model), plans)

    assert torch.allclose(logits(slim), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ref, dense, atol=1e-2)  # the plans did change the model
    shapes = layer_shapes(slim)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    assert shapes[0] == {"heads": 0, "kv_heads": 0, "channels": len(plans[0].kept_channels)}
    assert shapes[1]["heads"] == len(plans[1].kept_heads) and shapes[1]["kv_heads"] == model.config.num_key_value_heads
    assert shapes[2]["kv_heads"] == model.config.num_key_value_heads - 1 and shapes[2]["channels"] == 7
    assert shapes[3] == {"heads": 8, "kv_heads": model.config.num_key_value_heads, "channels": 0}
    assert slim.model.layers[1].self_attn.num_key_value_groups == len(plans[1].kept_heads) // (8 // rep)
    assert parameter_count(slim) == expected_params(model, shapes)
    assert slim.config.layer_num_attention_heads == [s["heads"] for s in shapes]
    assert slim.config.num_attention_heads == 8  # stock fields keep the original sizes


# left padding in row 1: positions and masks then depend on the cache length read from layer 0
MASK = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
GENERATE = dict(attention_mask=MASK, max_new_tokens=8, min_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_matches_without(tiny_llama_gqa, attn: str) -> None:
    plans = random_plans(random.Random(3), tiny_llama_gqa)
    zero_pruned(tiny_llama_gqa, plans)
    slim = shrink_model(copy.deepcopy(tiny_llama_gqa), plans)
    slim.config._attn_implementation = attn
    tiny_llama_gqa.config._attn_implementation = attn
    assert slim(IDS, use_cache=True).past_key_values.get_seq_length() == IDS.shape[1]
    cached = slim.generate(IDS, **GENERATE)
    uncached = slim.generate(IDS, use_cache=False, **GENERATE)
    assert cached.shape == (2, IDS.shape[1] + 8)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, tiny_llama_gqa.generate(IDS, **GENERATE))


def test_shrinking_a_shrunk_model_again(tiny_qwen2) -> None:
    first = random_plans(random.Random(4), tiny_qwen2)
    zero_pruned(tiny_qwen2, first)
    slim = shrink_model(tiny_qwen2, first)
    second = {
        0: LayerPlan(kept_heads=[], kept_channels=[0]),
        2: LayerPlan(kept_channels=[1, 3, 6]),
        3: LayerPlan(kept_heads=[1, 2, 5, 6], kept_channels=[]),
    }
    zero_pruned(slim, second)
    ref = logits(slim)
    twice = shrink_model(slim, second)
    assert torch.allclose(logits(twice), ref, atol=1e-5, rtol=0)
    assert layer_shapes(twice)[3] == {"heads": 4, "kv_heads": 2, "channels": 0}
    assert layer_shapes(twice)[2]["channels"] == 3


def test_tied_embeddings_stay_tied_and_count_once(tiny_llama) -> None:
    slim = shrink_model(tiny_llama, {1: LayerPlan(kept_heads=[0, 2, 4, 6])})
    assert slim.lm_head.weight is slim.model.embed_tokens.weight
    assert parameter_count(slim) == expected_params(slim, layer_shapes(slim))


def test_dtype_is_kept(tiny_llama_gqa) -> None:
    slim = shrink_model(tiny_llama_gqa.to(torch.bfloat16), {0: LayerPlan(kept_channels=[1, 2])})
    assert {p.dtype for p in slim.parameters()} == {torch.bfloat16}
    assert slim.model.layers[0].mlp.down_proj.weight.shape == (64, 2)


@pytest.mark.parametrize("plan", [
    {1: LayerPlan(kept_heads=[1, 0])},  # unsorted
    {1: LayerPlan(kept_heads=[0, 0, 4, 4])},  # duplicates
    {1: LayerPlan(kept_heads=[0, 8])},  # out of range
    {1: LayerPlan(kept_heads=[0, 1, 4])},  # 2 heads in group 0, 1 in group 1
    {1: LayerPlan(kept_channels=[95, 96])},
    {4: LayerPlan(kept_channels=[])},  # no layer 4
])
def test_invalid_plans_are_refused_before_any_change(tiny_llama_gqa, plan: dict[int, LayerPlan]) -> None:
    ref = logits(tiny_llama_gqa)
    with pytest.raises(ConfigError):
        shrink_model(tiny_llama_gqa, {0: LayerPlan(kept_heads=[]), **plan})
    assert layer_shapes(tiny_llama_gqa)[0]["heads"] == 8
    assert torch.equal(logits(tiny_llama_gqa), ref)
