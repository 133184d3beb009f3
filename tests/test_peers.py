"""The peer baselines (magnitude, Wanda-sp, FLAP, LLM-Pruner): their scores against direct
computations, their budgets, and the shrink/save/reload path, on tiny models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import embed_batches, layer_spaces, run_layerwise
from slimgpt.methods.base import PruneContext
from slimgpt.methods.flap import FLAP, HeadShapes, allocate, fluctuation, group_scores
from slimgpt.methods.flap import channel_scores as flap_channel_scores
from slimgpt.methods.flap import head_scores as flap_head_scores
from slimgpt.methods.llm_pruner import LLMPruner, taylor_scores
from slimgpt.methods.magnitude import Magnitude, magnitude_scores
from slimgpt.methods.scoring import select_heads
from slimgpt.methods.wanda_sp import WandaSP
from slimgpt.runner import LayerRunner, Timer
from slimgpt.schedule import LayerSpace, solve_widths
from slimgpt.surgery import layer_shapes, parameter_count, shrink_model

DEV = torch.device("cpu")
METHODS = ["magnitude", "wanda-sp", "flap", "llm-pruner"]


def calib_ids(n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def logits(model):
    with torch.no_grad():
        return model(calib_ids(2, 24, seed=99)).logits


def capture_inputs(model, calib):
    """Inputs of every o_proj and down_proj in one dense forward of the stock model (independent
    of the adapter and the layer runner), as (tokens, columns) matrices."""
    ad = get_adapter(model)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(ad.layers):
        for name, lin in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            key = f"{name}{i}"
            seen[key] = []
            handles.append(lin.register_forward_pre_hook(lambda _m, a, k=key: seen[k].append(a[0].detach())))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for k, v in seen.items()}


def context(model, calib, ratio):
    ad = get_adapter(model)
    cfg = PruneConfig(model="tiny", ratio=ratio, batch_size=4)
    return PruneContext(model, ad, calib, cfg, DEV, layer_spaces(ad), parameter_count(model), Timer(), False)


def plans_for(name, model, ratio, calib):
    """The plans of method ``name`` on ``model`` (edited in place), as api.prune would make them."""
    ctx = context(model, calib, ratio)
    if name in ("flap", "llm-pruner"):
        return (FLAP() if name == "flap" else LLMPruner()).plan(ctx)
    method = Magnitude() if name == "magnitude" else WandaSP()
    widths = solve_widths(ctx.spaces, ctx.dense_params, ratio, "log")
    return run_layerwise(ctx.adapter, calib, method, widths, ctx.spaces, DEV, batch_size=4, progress=False).plans


# ---- selection -------------------------------------------------------------------------------------


def test_select_heads_respects_groups():
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 0.5, 0.1, 0.2, 9.0, 2.0, 8.0, 7.0, 6.0])  # 3 groups of 4
    assert select_heads(scores, 3, 0, 0) is None
    assert select_heads(scores, 3, 0, 1) == [0, 2, 3, 4, 6, 7, 9, 10, 11]  # lowest of each group goes
    assert select_heads(scores, 3, 1, 0) == [0, 1, 2, 3, 8, 9, 10, 11]  # group 1 sums lowest (9.8)
    group = torch.tensor([0.0, 5.0, 5.0])  # explicit group scores win over the sum
    assert select_heads(scores, 3, 1, 2, group) == [4, 7, 9, 10]


# ---- scores against direct computations ----------------------------------------------------------------


def test_magnitude_scores_are_l2_norms(tiny_llama_gqa):
    ad = get_adapter(tiny_llama_gqa)
    layer = ad.layers[1]
    a, m = layer.self_attn, layer.mlp
    heads, groups, channels = magnitude_scores(ad, layer)
    d, n_rep = 8, 4
    for h in range(8):
        w = torch.cat([a.q_proj.weight[h * d:(h + 1) * d].flatten(), a.o_proj.weight[:, h * d:(h + 1) * d].flatten()])
        torch.testing.assert_close(heads[h], torch.linalg.norm(w))
    for g in range(2):
        qs = slice(g * n_rep * d, (g + 1) * n_rep * d)
        w = torch.cat([a.q_proj.weight[qs].flatten(), a.o_proj.weight[:, qs].flatten(),
                       a.k_proj.weight[g * d:(g + 1) * d].flatten(), a.v_proj.weight[g * d:(g + 1) * d].flatten()])
        torch.testing.assert_close(groups[g], torch.linalg.norm(w))
    for c in (0, 17, 95):
        w = torch.cat([m.gate_proj.weight[c], m.up_proj.weight[c], m.down_proj.weight[:, c]])
        torch.testing.assert_close(channels[c], torch.linalg.norm(w))


def test_wanda_sp_scores_match_hand_loop(tiny_qwen2):
    calib = calib_ids()
    x = capture_inputs(tiny_qwen2, calib)
    ad = get_adapter(tiny_qwen2)
    layer = ad.layers[0]
    run = LayerRunner(0, layer, ad, embed_batches(ad, calib, 4, DEV), ad.context(32, DEV, torch.float32), DEV, Timer())
    m = WandaSP()
    heads, channels = m.head_scores(run), m.channel_scores(run)
    o, down = layer.self_attn.o_proj.weight.detach().double(), layer.mlp.down_proj.weight.detach().double()
    for h in range(8):
        s = 0.0
        for c in range(h * 8, (h + 1) * 8):
            norm = sum(float(t) ** 2 for t in x["o0"][:, c]) ** 0.5
            s += sum(abs(float(w)) for w in o[:, c]) * norm
        assert heads[h].item() == pytest.approx(s, rel=1e-5)
    for c in (0, 40, 95):
        norm = sum(float(t) ** 2 for t in x["down0"][:, c]) ** 0.5
        assert channels[c].item() == pytest.approx(sum(abs(float(w)) for w in down[:, c]) * norm, rel=1e-5)


def test_flap_fluctuation_is_variance_times_column_norm(tiny_llama_gqa):
    calib = calib_ids()
    x = capture_inputs(tiny_llama_gqa, calib)
    ctx = context(tiny_llama_gqa, calib, 0.2)
    attn, mlp = FLAP().statistics(ctx)
    for i, layer in enumerate(ctx.adapter.layers):  # every layer: statistics come from the dense model
        for key, stats, w in ((f"o{i}", attn[i], layer.self_attn.o_proj.weight),
                              (f"down{i}", mlp[i], layer.mlp.down_proj.weight)):
            ref = x[key].var(0, unbiased=True) * w.double().pow(2).sum(0)
            torch.testing.assert_close(fluctuation(w, stats.var), ref, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(stats.mean, x[key].mean(0), rtol=1e-5, atol=1e-7)


def test_flap_head_scores_square_the_attention_metric_like_the_released_code():
    """By hand, one layer: o_proj ``W = [[1, 1, 2, 1]]`` (two heads of two columns), input
    variances ``[1, 2, 1, 4]``. WIFV = var·W² = [1, 2, 4, 4]; FLAP's lib/prune.py squares it for
    o_proj: [1, 4, 16, 16], mean 9.25, unbiased std sqrt(186.75/3) = 7.8899; standardized
    [-1.0456, -0.6653, 0.8555, 0.8555]; head means [-0.8555, 0.8555]. Unsquared (the paper's
    formula) the means are [-0.8333, 0.8333] (std 1.5): the difference is what changes how
    heads rank against channels. FFN channels are not squared."""
    W = torch.tensor([[1.0, 1.0, 2.0, 1.0]])
    var = torch.tensor([1.0, 2.0, 1.0, 4.0])
    std = (186.75 / 3) ** 0.5
    want = torch.tensor([((1 - 9.25) / std + (4 - 9.25) / std) / 2, (16 - 9.25) / std], dtype=torch.float64)
    torch.testing.assert_close(flap_head_scores(W, var, 2), want)
    assert want[1].item() == pytest.approx(0.8555, abs=1e-4)
    torch.testing.assert_close(flap_head_scores(W, var, 2, square=False),
                               torch.tensor([-2.5 / 3, 2.5 / 3], dtype=torch.float64))
    torch.testing.assert_close(flap_channel_scores(W, var),
                               torch.tensor([-1.75, -0.75, 1.25, 1.25], dtype=torch.float64) / 1.5)


def test_flap_bias_compensation_keeps_output_means(tiny_qwen2):
    """On calibration data, every pruned o_proj / down_proj has the dense layer's mean output
    (Eq. 7), though it lost columns."""
    calib = calib_ids()
    dense = copy.deepcopy(tiny_qwen2)
    x = capture_inputs(dense, calib)
    plans = FLAP().plan(context(tiny_qwen2, calib, 0.4))  # at 0.3 no head of this model goes yet
    assert any(p.kept_heads is not None for p in plans.values()) and all(p.kept_channels for p in plans.values())
    for i in range(4):
        for key, lin, ref in ((f"o{i}", tiny_qwen2.model.layers[i].self_attn.o_proj, dense.model.layers[i].self_attn.o_proj),
                              (f"down{i}", tiny_qwen2.model.layers[i].mlp.down_proj, dense.model.layers[i].mlp.down_proj)):
            xi = x[key].float()
            with torch.no_grad():
                pruned, full = lin(xi), ref(xi)
            went = plans[i].kept_heads is not None if key[0] == "o" else plans[i].kept_channels is not None
            assert went == (not torch.allclose(pruned, full, atol=1e-3))  # columns really went
            torch.testing.assert_close(pruned.mean(0), full.mean(0), atol=2e-5, rtol=1e-4)


def test_flap_allocation_is_global_and_hits_target():
    """Channels removed anywhere score no higher than channels kept anywhere (one global
    threshold), layers get different ratios, and the total is within one channel of the target."""
    g = torch.Generator().manual_seed(0)
    spaces = [LayerSpace(9, 3, 60, 130, 100, 30) for _ in range(5)]
    heads = [torch.randn(9, generator=g) + i for i in range(5)]
    channels = [torch.randn(60, generator=g) + 0.5 * i for i in range(5)]
    target = 0.35 * sum(s.params for s in spaces)
    widths = allocate(spaces, heads, channels, target)
    removed = sum(s.params - w.params(s) for s, w in zip(spaces, widths))
    assert abs(removed - target) <= 30 / 2
    kept_min = min(c.sort(descending=True).values[: w.channels].min() for c, w in zip(channels, widths) if w.channels)
    gone_max = max(c.sort(descending=True).values[w.channels:].max() for c, w in zip(channels, widths) if w.channels < 60)
    assert gone_max <= kept_min
    assert len({w.channels for w in widths}) > 1
    for s, w in zip(spaces, widths):
        assert w.heads(s) in (0, 1, 2, 3, 4, 6, 9)


def _gqa_masks(kv, n_rep):
    """Every keep-mask of ``kv × n_rep`` query heads that stock grouped-query attention can run:
    each group keeps none or the same number of its heads (brute force, independent of HeadShapes)."""
    for bits in itertools.product([False, True], repeat=kv * n_rep):
        kept = [sum(bits[g * n_rep:(g + 1) * n_rep]) for g in range(kv)]
        if len({k for k in kept if k}) <= 1:
            yield torch.tensor(bits)


@pytest.mark.parametrize("kv,n_rep", [(3, 3), (2, 4), (4, 1)])
def test_flap_head_shape_is_the_best_valid_one_by_brute_force(kv, n_rep):
    """FLAP's rule removes every head scoring below the threshold; under grouped-query attention
    a layer takes the valid shape with the largest total margin Σ(threshold − score) over its
    removed heads. Checked against every valid mask; with one head per group (MHA, the released
    code's case) it is exactly "every head below the threshold goes"."""
    g = torch.Generator().manual_seed(kv * 10 + n_rep)
    space = LayerSpace(kv * n_rep, kv, 4, 10, 7, 3)
    masks = list(_gqa_masks(kv, n_rep))
    for _ in range(20):
        scores = torch.randn(kv * n_rep, generator=g, dtype=torch.float64)
        t = float(torch.randn(1, generator=g))
        shapes = HeadShapes(space, scores)
        want = max(float((t - scores[~m]).sum()) for m in masks)
        rg, rp = shapes.shape[shapes.best(t)]
        kept = select_heads(scores, kv, rg, rp, group_scores(scores, kv, rp))
        mask = torch.ones(kv * n_rep, dtype=torch.bool)
        if kept is not None:
            mask[:] = False
            mask[kept] = True
        assert any(torch.equal(mask, m) for m in masks)
        assert float((t - scores[~mask]).sum()) == pytest.approx(want, abs=1e-12)
        if n_rep == 1:
            assert torch.equal(mask, scores >= t)


def test_flap_allocation_counts_real_parameters_and_keeps_heads_a_lone_removal_would_waste():
    """SmolLM2's case (9 query heads in 3 groups): 4 heads score below every channel, so FLAP's
    free rule would drop them. No valid shape removes exactly those: the layer keeps 6 (the
    lowest head of each group goes), not 3, and the budget counts a group's key/value rows only
    when the whole group goes (here none: three query heads cost 3 × 128)."""
    space = LayerSpace(9, 3, 200, 128, 128, 3)
    heads = [torch.tensor([-3.0, -1.05, 0.5, -2.8, 0.6, 0.7, -2.7, 0.8, 0.9], dtype=torch.float64)]
    channels = [torch.linspace(-1.0, 1.0, 200, dtype=torch.float64)]
    target = 3 * 128 + 150 * 3  # three query heads and 150 channels
    (w,) = allocate([space], heads, channels, target)
    assert (w.remove_groups, w.remove_per_group) == (0, 1) and w.heads(space) == 6
    assert space.params - w.params(space) == target
    assert select_heads(heads[0], 3, 0, 1, group_scores(heads[0], 3, 1)) == [1, 2, 4, 5, 7, 8]
    assert w.channels == 50


def test_llm_pruner_taylor_scores_match_autograd(tiny_llama_gqa):
    model = tiny_llama_gqa
    calib = calib_ids(4, 16)
    ad = get_adapter(model)
    scores = taylor_scores(model, ad, calib, [0, 2], DEV)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    ref = copy.deepcopy(model)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lins = {i: {**{n: getattr(ref.model.layers[i].self_attn, n) for n in names},
                **{n: getattr(ref.model.layers[i].mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}}
            for i in (0, 2)}
    params = [lin.weight for d in lins.values() for lin in d.values()]
    loss = ref(input_ids=calib, labels=calib).loss  # whole batch at once, not accumulated
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    d = 8
    for i in (0, 2):
        imp = {n: (lin.weight * grads[id(lin.weight)]).abs().detach() for n, lin in lins[i].items()}
        heads, groups, channels = scores[i]
        for h in range(8):
            ref_h = imp["q_proj"][h * d:(h + 1) * d].sum() + imp["o_proj"][:, h * d:(h + 1) * d].sum()
            torch.testing.assert_close(heads[h], ref_h, rtol=1e-4, atol=1e-7)
        for kv in range(2):
            ref_g = (imp["q_proj"][kv * 32:(kv + 1) * 32].sum() + imp["o_proj"][:, kv * 32:(kv + 1) * 32].sum()
                     + imp["k_proj"][kv * d:(kv + 1) * d].sum() + imp["v_proj"][kv * d:(kv + 1) * d].sum())
            torch.testing.assert_close(groups[kv], ref_g, rtol=1e-4, atol=1e-7)
        ref_c = imp["gate_proj"].sum(1) + imp["up_proj"].sum(1) + imp["down_proj"].sum(0)
        torch.testing.assert_close(channels, ref_c, rtol=1e-4, atol=1e-7)


def test_llm_pruner_prunes_only_its_layer_range():
    model = build_tiny(LlamaConfig, LlamaForCausalLM, num_hidden_layers=10, num_key_value_heads=2)
    dense = copy.deepcopy(model)
    plans = LLMPruner().plan(context(model, calib_ids(4, 16), 0.2))
    assert sorted(plans) == [4, 5, 6, 7]  # [4, L-2)
    assert len({len(p.kept_heads or range(8)) for p in plans.values()}) == 1  # one uniform ratio inside
    kept = [len(p.kept_channels) for p in plans.values()]
    assert max(kept) - min(kept) <= 3  # ... up to the rounding residual absorbed by the deepest layers
    for i in (0, 1, 2, 3, 8, 9):  # outside the range: untouched
        a, b = model.model.layers[i].state_dict(), dense.model.layers[i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    shapes = layer_shapes(shrink_model(model, plans))
    assert shapes[0] == {"heads": 8, "kv_heads": 2, "channels": 96} and shapes[5]["channels"] < 96


# ---- budget, shrink, save and reload ----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_qwen2"])
def test_shrunk_equals_zeroed_full_model(name, fixture, request):
    model = request.getfixturevalue(fixture)
    plans = plans_for(name, model, 0.3, calib_ids())
    unshrunk = copy.deepcopy(model)
    pruned = shrink_model(model, plans)
    torch.testing.assert_close(logits(pruned), logits(unshrunk), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_api_budget_save_and_reload(name, tiny_llama, tiny_tokenizer, calib_file, tmp_path):
    dense = parameter_count(tiny_llama)
    per_channel = layer_spaces(get_adapter(tiny_llama))[0].per_channel
    out = tmp_path / name
    cfg = PruneConfig(model="tiny", out=str(out), method=name, ratio=0.25, calib=calib_file, nsamples=8,
                      seqlen=32, batch_size=4)
    res = prune(cfg, model=tiny_llama, tokenizer=tiny_tokenizer, progress=False)
    assert res.report["method"]["name"] == name
    assert abs((dense - parameter_count(res.model)) - 0.25 * dense) <= per_channel
    assert parameter_count(res.model) < dense
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert parameter_count(reloaded) == parameter_count(res.model)
    torch.testing.assert_close(logits(reloaded), logits(res.model), atol=0, rtol=0)
    if name == "flap":
        assert reloaded.config.o_proj_bias and reloaded.model.layers[0].mlp.down_proj.bias is not None


def test_llm_pruner_range_too_small_is_a_config_error():
    from slimgpt.errors import ConfigError

    model = build_tiny(LlamaConfig, LlamaForCausalLM, num_hidden_layers=8, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="layers 4..5"):
        LLMPruner().plan(context(model, calib_ids(2, 8), 0.4))
