"""BlockPruner, ShortGPT and slimgpt+blockpruner on tiny models, against independent references:
full Hugging Face forwards of models with blocks zeroed, and hook-captured layer inputs/outputs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces
from slimgpt.errors import ConfigError
from slimgpt.io import load_pruned
from slimgpt.methods.blockpruner import BlockChain, block_params, block_search, chain_nll, sweep
from slimgpt.methods.hybrid import remaining_spaces
from slimgpt.surgery import layer_shapes, parameter_count

DEV = torch.device("cpu")


def calib_ids(n=8, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def skipped(model, blocks):
    """A copy of ``model`` whose residual blocks ``blocks`` add nothing (output weights and biases zeroed)."""
    m = copy.deepcopy(model)
    ad = get_adapter(m)
    with torch.no_grad():
        for b in blocks:
            layer = ad.layers[b // 2]
            lin = ad.attention(layer).o if b % 2 == 0 else ad.mlp(layer).down
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return m


def reference_ppl(model, ids):
    """Perplexity from a plain full forward: exp of the token-weighted mean next-token NLL."""
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1), reduction="mean")
    return math.exp(float(nll))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_cached_sweep_equals_full_forward(fixture, request):
    model = request.getfixturevalue(fixture)
    ad = get_adapter(model)
    ids = calib_ids()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    chain = BlockChain(ad, ids.shape[1], DEV)
    already = [3]  # layer 1's MLP removed before this round
    present = [b for b in range(8) if b not in already]
    cand, current = sweep(chain, list(ids.split(3)), present)  # uneven batches on purpose
    assert math.exp(current / tokens) == pytest.approx(reference_ppl(skipped(model, already), ids), rel=1e-5)
    for b, nll in zip(present, cand):
        ref = reference_ppl(skipped(model, already + [b]), ids)
        assert math.exp(nll / tokens) == pytest.approx(ref, rel=1e-5), b
    assert len(set(round(c, 3) for c in cand)) == len(cand)  # the candidates really differ
    # The sweep needs R(R-1)/2 + R block passes per batch, against R(R-1) from the embedding.
    R = len(present)
    assert chain.block_passes == 3 * (R * (R - 1) // 2 + R)
    chain.block_passes = 0
    chain_nll(chain, list(ids.split(3)), present)
    assert chain.block_passes == 3 * R


def test_search_is_greedy_by_perplexity(tiny_llama_gqa):
    model = tiny_llama_gqa
    ad = get_adapter(model)
    ids = calib_ids()
    res = block_search(ad, ids, layer_spaces(ad), DEV, n_blocks=3, batch_size=4, progress=False)
    assert len(res.removed) == 3 and len(res.steps) == 3
    assert res.evaluations == 8 + 7 + 6
    # Independent greedy search with full forwards.
    removed = []
    for step in res.steps:
        scores = {b: reference_ppl(skipped(model, removed + [b]), ids) for b in range(8) if b not in removed}
        best = min(scores, key=lambda b: (scores[b], b))
        removed.append(best)
        assert step["ppl"] == pytest.approx(scores[best], rel=1e-5)
    assert res.removed == removed
    assert res.steps[0]["ppl"] >= 0 and res.dense_ppl == pytest.approx(reference_ppl(model, ids), rel=1e-5)


def test_ratio_target_stops_at_nearest_block_count(tiny_llama):
    ad = get_adapter(tiny_llama)
    spaces = layer_spaces(ad)
    dense = parameter_count(tiny_llama)
    target = 0.25 * dense
    res = block_search(ad, calib_ids(), spaces, DEV, target_params=target, dense_params=dense, progress=False)
    got = sum(block_params(spaces, b) for b in res.removed)
    sizes = sorted({block_params(spaces, b) for b in range(8)})
    assert abs(got - target) <= max(sizes) / 2
    applied = [s for s in res.steps if not s.get("undone")]
    assert [s["block"] for s in applied] == [f"{b // 2}.{('attn', 'mlp')[b % 2]}" for b in res.removed]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "biased"])
def test_prune_removes_blocks_and_reloads(fixture, request, tiny_tokenizer, calib_file, tmp_path):
    """Also with o_proj / down_proj biases, which surgery keeps: they must not leak into the stream."""
    if fixture == "biased":
        model = build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    else:
        model = request.getfixturevalue(fixture)
    dense = copy.deepcopy(model)
    out = tmp_path / "bp"
    cfg = PruneConfig(model="tiny", out=str(out), method="blockpruner", blocks=3, calib=calib_file,
                      nsamples=8, seqlen=32, batch_size=4)
    res = prune(cfg, model=model, tokenizer=tiny_tokenizer, progress=False)
    search = res.report["method"]["search"]
    removed = search["removed"]
    assert len(removed) == 3
    blocks = [int(n.split(".")[0]) * 2 + (n.endswith("mlp")) for n in removed]
    shapes = layer_shapes(res.model)
    gone = [b for b in range(8) if (shapes[b // 2]["heads"] if b % 2 == 0 else shapes[b // 2]["channels"]) == 0]
    assert sorted(blocks) == gone
    for b in range(8):  # untouched blocks keep their full width
        s = shapes[b // 2]
        if b not in blocks:
            assert (s["heads"], s["kv_heads"]) == (8, dense.config.num_key_value_heads) if b % 2 == 0 else s["channels"] == 96
    spaces = layer_spaces(get_adapter(dense))
    assert parameter_count(dense) - parameter_count(res.model) == sum(block_params(spaces, b) for b in blocks)
    ids = calib_ids(2, 16, seed=7)
    with torch.no_grad():
        ref = skipped(dense, blocks)(ids).logits
        got = res.model(ids).logits
        reloaded, _ = load_pruned(out)
        again = reloaded(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, got)
    meta = json.loads((out / "slimgpt.json").read_text())
    assert meta["method"]["search"]["removed"] == removed and len(meta["method"]["search"]["steps"]) >= 3
    assert meta["method"]["search"]["evaluations"] == 8 + 7 + 6


def test_shortgpt_removes_lowest_block_influence(tiny_llama_gqa, tiny_tokenizer, calib_file):
    from slimgpt.data.calibration import get_calibration

    model = tiny_llama_gqa
    dense = copy.deepcopy(model)
    ids = get_calibration(calib_file, tiny_tokenizer, 8, 32, seed=0)
    # Direct BI: hooks on whole decoder layers in a stock forward.
    ins, outs = {}, {}
    hooks = []
    for i, layer in enumerate(dense.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kw, i=i: ins.__setitem__(i, (a[0] if a else kw["hidden_states"])), with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()
    bi = [1 - F.cosine_similarity(ins[i].double(), outs[i].double(), dim=-1).mean().item() for i in range(4)]
    expected = sorted(sorted(range(4), key=lambda i: bi[i])[:2])

    cfg = PruneConfig(model="tiny", method="shortgpt", blocks=4, calib=calib_file, nsamples=8, seqlen=32, batch_size=3)
    res = prune(cfg, model=model, tokenizer=tiny_tokenizer, progress=False)
    got = res.report["method"]["search"]
    assert got["removed_layers"] == expected
    assert got["block_influence"] == pytest.approx(bi, abs=1e-5)
    shapes = layer_shapes(res.model)
    assert [i for i, s in enumerate(shapes) if s["heads"] == 0 and s["channels"] == 0] == expected

    with pytest.raises(ConfigError):
        PruneConfig(model="tiny", method="slimgpt", blocks=2).validate()
    with pytest.raises(ConfigError):
        prune(PruneConfig(model="tiny", method="shortgpt", blocks=3, calib=calib_file, nsamples=4, seqlen=16),
              model=copy.deepcopy(dense), tokenizer=tiny_tokenizer, progress=False)


def test_remaining_spaces_count_removed_blocks_as_gone(tiny_llama):
    spaces = layer_spaces(get_adapter(tiny_llama))
    rest = remaining_spaces(spaces, [0, 3, 4, 5])
    assert rest[0].params == spaces[0].channels * spaces[0].per_channel
    assert rest[1].params == spaces[1].num_heads * spaces[1].per_q_head + spaces[1].num_kv_heads * spaces[1].per_kv_head
    assert rest[2].params == 0 and rest[3] == spaces[3]


@pytest.mark.parametrize("share", [0.5, 0.0, 1.0])
def test_hybrid_hits_ratio(share, tiny_llama_gqa, tiny_tokenizer, calib_file, tmp_path):
    model = tiny_llama_gqa
    dense = parameter_count(model)
    spaces = layer_spaces(get_adapter(model))
    cfg = PruneConfig(model="tiny", out=str(tmp_path / "h"), method="slimgpt+blockpruner", ratio=0.3, depth_share=share,
                      calib=calib_file, nsamples=8, seqlen=32, batch_size=4)
    res = prune(cfg, model=model, tokenizer=tiny_tokenizer, progress=False)
    removed = dense - parameter_count(res.model)
    meth = res.report["method"]
    depth = meth["depth_params_removed"]
    per_channel = spaces[0].per_channel
    biggest_block = max(block_params(spaces, b) for b in range(8))
    if share < 1:
        assert abs(removed - 0.3 * dense) <= per_channel  # width absorbs the depth rounding
    else:
        assert abs(removed - 0.3 * dense) <= biggest_block / 2
    assert abs(depth - share * 0.3 * dense) <= biggest_block / 2
    shapes = layer_shapes(res.model)
    for name in (meth.get("search") or {}).get("removed", []):
        layer, kind = name.split(".")
        assert (shapes[int(layer)]["heads"] if kind == "attn" else shapes[int(layer)]["channels"]) == 0
    if share == 0.5:
        assert depth > 0 and any(s["channels"] not in (0, 96) for s in shapes)  # both depth and width happened
    reloaded, _ = load_pruned(tmp_path / "h")
    ids = calib_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, res.model(ids).logits)


def test_hybrid_width_pass_runs_on_the_depth_pruned_model(tiny_qwen2, tiny_tokenizer, calib_file):
    """The hybrid equals, bitwise, BlockPruner's removals applied first and SlimGPT run afterwards on
    that model with the schedule solved over the remaining blocks."""
    from slimgpt.data.calibration import get_calibration
    from slimgpt.driver import run_layerwise
    from slimgpt.methods.slimgpt import SlimGPT
    from slimgpt.plan import LayerPlan
    from slimgpt.schedule import LayerWidth, solve_widths
    from slimgpt.surgery import shrink_model

    dense_model = copy.deepcopy(tiny_qwen2)
    cfg = PruneConfig(model="tiny", method="slimgpt+blockpruner", ratio=0.35, calib=calib_file, nsamples=8, seqlen=32,
                      batch_size=4)
    res = prune(cfg, model=tiny_qwen2, tokenizer=tiny_tokenizer, progress=False)
    removed = [int(n.split(".")[0]) * 2 + n.endswith("mlp") for n in res.report["method"]["search"]["removed"]]
    assert removed

    manual = skipped(dense_model, removed)  # zeroed independently of the method's code
    ad = get_adapter(manual)
    dense = parameter_count(manual)
    spaces = layer_spaces(ad)
    plans = {}
    for b in removed:
        plan = plans.setdefault(b // 2, LayerPlan())
        if b % 2:
            plan.kept_channels = []
        else:
            plan.kept_heads = []
    rest = remaining_spaces(spaces, removed)
    alive = [i for i, s in enumerate(rest) if s.params]
    widths = [LayerWidth(0, 0, s.channels, 0.0) for s in rest]
    depth = sum(block_params(spaces, b) for b in removed)
    for i, w in zip(alive, solve_widths([rest[i] for i in alive], dense, (0.35 * dense - depth) / dense)):
        widths[i] = w
    calib = get_calibration(calib_file, tiny_tokenizer, 8, 32, seed=0)
    width_plans = run_layerwise(ad, calib, SlimGPT(), widths, rest, DEV, batch_size=4, progress=False).plans
    for i, p in width_plans.items():
        if i in plans:
            p.kept_heads = plans[i].kept_heads if plans[i].kept_heads is not None else p.kept_heads
            p.kept_channels = plans[i].kept_channels if plans[i].kept_channels is not None else p.kept_channels
    slim = shrink_model(manual, width_plans)
    ids = calib_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(slim(ids).logits, res.model(ids).logits)


def test_search_in_another_dtype_uses_a_cast_copy(tiny_llama_gqa):
    """The bf16 search equals a search on a copy with every parameter cast (buffers such as RoPE
    frequencies kept in fp32), and leaves the model as it was."""
    from slimgpt.twin import resolve_search_dtype, search_adapter

    model = tiny_llama_gqa
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    ids = calib_ids()
    with search_adapter(ad, DEV, torch.bfloat16) as twin:
        assert twin.model is not model and next(twin.model.parameters()).dtype == torch.bfloat16
        got = block_search(twin, ids, spaces, DEV, n_blocks=2, batch_size=4, progress=False)
    cast = copy.deepcopy(model)
    for p in cast.parameters():
        p.data = p.data.to(torch.bfloat16)
    ref = block_search(get_adapter(cast), ids, spaces, DEV, n_blocks=2, batch_size=4, progress=False)
    assert got.removed == ref.removed
    assert [s["candidates"] for s in got.steps] == [s["candidates"] for s in ref.steps]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with search_adapter(ad, DEV, torch.float32) as same:
        assert same is ad
    assert resolve_search_dtype("float32", torch.float32, DEV) == torch.float32
    assert resolve_search_dtype("auto", torch.float16, torch.device("cuda")) == torch.float16
    assert resolve_search_dtype("auto", torch.float32, DEV) in (torch.float32, torch.bfloat16)


def test_search_subset_and_dtype_are_used_and_recorded(tiny_llama, tiny_tokenizer, calib_file, tmp_path):
    cfg = PruneConfig(model="tiny", out=str(tmp_path / "bp"), method="blockpruner", blocks=2, calib=calib_file,
                      nsamples=8, seqlen=32, batch_size=4, search_nsamples=3, search_dtype="float32")
    res = prune(cfg, model=tiny_llama, tokenizer=tiny_tokenizer, progress=False)
    search = res.report["method"]["search"]
    assert search["calibration_tokens"] == 3 * 31
    assert search["extra"]["search_windows"] == 3 and search["extra"]["search_dtype"] == "float32"
    assert res.report["params"]["target_ratio"] is None and res.report["params"]["target_blocks"] == 2


@pytest.mark.parametrize("kw", [{"search_dtype": "fp8"}, {"search_nsamples": 0}])
def test_bad_search_settings_fail_early(kw):
    with pytest.raises(ConfigError, match="--search"):
        PruneConfig(method="blockpruner", **kw).validate()


def test_interrupted_search_resumes_to_the_same_result(tiny_llama_gqa, tiny_tokenizer, calib_file, tmp_path,
                                                       monkeypatch):
    import slimgpt.methods.blockpruner as bp

    def cfg(out, resume=False):
        return PruneConfig(model="tiny", out=str(out), method="blockpruner", blocks=3, calib=calib_file, nsamples=8,
                           seqlen=32, batch_size=4, search_dtype="float32", resume=resume)

    whole = prune(cfg(tmp_path / "whole"), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer,
                  progress=False)
    out = tmp_path / "cut"
    journal = bp.SearchJournal.for_out(out)
    real, calls = bp.sweep_rows, []

    def dies_in_round_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(bp, "sweep_rows", dies_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        prune(cfg(out), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer, progress=False)
    assert not out.exists() and len(json.loads(journal.read_text())["removed"]) == 2
    with pytest.raises(ConfigError, match="--resume"):  # not silently restarted or mixed
        prune(cfg(out), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer, progress=False)
    other = cfg(out, resume=True)
    other.seed = 1
    with pytest.raises(ConfigError, match="other settings"):
        prune(other, model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer, progress=False)
    calls.clear()
    monkeypatch.setattr(bp, "sweep", lambda *a: calls.append(1) or real(*a))
    res = prune(cfg(out, resume=True), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer, progress=False)
    assert len(calls) == 1  # only the third round was searched
    a, b = res.report["method"]["search"], whole.report["method"]["search"]
    assert a["removed"] == b["removed"] and a["steps"] == b["steps"] and a["evaluations"] == b["evaluations"]
    assert a["block_passes"] == b["block_passes"]
    assert not journal.exists() and out.is_dir()
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(res.model(ids).logits, whole.model(ids).logits)
