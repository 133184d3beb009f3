"""Schedules and the solve to a whole-model parameter target."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import build_tiny
from slimgpt.arch import get_adapter
from slimgpt.driver import layer_spaces
from slimgpt.errors import ConfigError
from slimgpt.methods.scoring import select_channels, select_heads
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerSpace, removed_params, round_layer, schedule_ratios, solve_widths
from slimgpt.surgery import shrink_model


def spaces(n=30, heads=9, kv=3, ch=1536, hidden=576, d=64):
    return [LayerSpace(heads, kv, ch, 2 * d * hidden, 2 * d * hidden, 3 * hidden) for _ in range(n)]


def test_log_schedule_is_eq6():
    r = schedule_ratios("log", 32, 0.0625, 0.25)
    assert r[0] == pytest.approx(0.0625) and r[-1] == pytest.approx(0.25)
    assert r[10] == pytest.approx(0.0625 + 0.1875 * math.log(11) / math.log(32))
    assert sum(r) / 32 == pytest.approx(0.2, abs=0.01)  # the authors' 7B example averages 0.2
    assert schedule_ratios("log-decrease", 32, 0.0625, 0.25) == r[::-1]
    lin = schedule_ratios("linear", 5, 0.1, 0.5)
    assert lin == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize("schedule", ["log", "linear", "uniform", "log-decrease", "linear-decrease"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("n", [7, 30])
def test_solve_hits_target_within_one_channel(schedule, ratio, n):
    sp = spaces(n)
    total = int(1.27 * sum(s.params for s in sp))  # SmolLM2-135M: 21 % of parameters are embeddings
    widths = solve_widths(sp, total, ratio, schedule)
    assert len(widths) == n
    assert abs(removed_params(sp, widths) - ratio * total) <= sp[0].per_channel / 2
    ratios = [w.ratio for w in widths]
    if schedule in ("log", "linear"):
        assert ratios == sorted(ratios)
    if schedule.endswith("decrease"):
        assert ratios == sorted(ratios, reverse=True)


def test_rounding_respects_gqa():
    s = LayerSpace(14, 2, 4864, 2 * 64 * 896 + 64, 2 * 64 * 896 + 128, 3 * 896)
    for r in [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]:
        w = round_layer(s, r)
        heads = w.heads(s)
        assert heads % max(w.kv_heads(s), 1) == 0
        assert heads == 0 or w.kv_heads(s) >= 1
    assert round_layer(s, 0.0).heads(s) == 14 and round_layer(s, 1.0).heads(s) == 0


def test_bad_targets_are_clear():
    sp = spaces(4)
    total = sum(s.params for s in sp) * 2
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        solve_widths(sp, total, 1.0)
    with pytest.raises(ConfigError, match="only"):
        solve_widths(sp, total, 0.6)


def test_steep_schedule_raises_first_ratio_instead_of_clipping():
    sp = spaces(30)
    total = int(1.27 * sum(s.params for s in sp))
    widths = solve_widths(sp, total, 0.5, "linear")  # mean layer ratio 0.635 needs a deep end > 1 from r0 = 0.2
    ratios = [w.ratio for w in widths]
    assert max(ratios) <= 1.0 and ratios[-1] == pytest.approx(1.0)
    assert ratios[0] > 0.635 / 3.2  # the first ratio was raised
    assert abs(removed_params(sp, widths) - 0.5 * total) <= sp[0].per_channel / 2


def test_schedule_file(tmp_path):
    sp = spaces(3)
    f = tmp_path / "s.json"
    f.write_text("[0.1, 0.2, 0.3]")
    w = solve_widths(sp, 10**9, 0.1, str(f))
    assert [x.ratio for x in w] == [0.1, 0.2, 0.3]
    f.write_text("[0.1, 0.2]")
    with pytest.raises(ConfigError, match="2 ratios but the model has 3 layers"):
        solve_widths(sp, 10**9, 0.1, str(f))


@pytest.mark.parametrize("schedule", ["log", "uniform", "linear-decrease"])
@pytest.mark.parametrize("ratio", [0.2, 0.45])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_solved_widths_hit_the_target_in_the_cut_tensors(arch, ratio, schedule):
    """Score the solve by what surgery actually removes, not by the ``removed_params`` it
    optimises: cut a real model (q/k/v biases, grouped-query attention, tied or untied
    embeddings) to the solved widths and count its parameters."""
    if arch == "qwen2":
        model = build_tiny(Qwen2Config, Qwen2ForCausalLM, num_hidden_layers=7, num_key_value_heads=2,
                           tie_word_embeddings=False)
    else:
        model = build_tiny(LlamaConfig, LlamaForCausalLM, num_hidden_layers=7, num_key_value_heads=4,
                           tie_word_embeddings=True)
    dense = sum(p.numel() for p in model.parameters())  # tied embeddings once
    ad = get_adapter(model)
    sp = layer_spaces(ad)
    widths = solve_widths(sp, dense, ratio, schedule)
    g = torch.Generator().manual_seed(0)
    plans = {}
    for i, (s, w) in enumerate(zip(sp, widths)):
        heads = select_heads(torch.rand(s.num_heads, generator=g), s.num_kv_heads, w.remove_groups,
                             w.remove_per_group)
        plans[i] = LayerPlan(heads, select_channels(torch.rand(s.channels, generator=g), w.channels))
    pruned = shrink_model(model, plans)
    cut = dense - sum(p.numel() for p in pruned.parameters())
    assert cut == removed_params(sp, widths)
    assert abs(cut - ratio * dense) <= sp[0].per_channel / 2
