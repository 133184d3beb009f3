"""Gemma 3 (text) on a tiny random model: the adapter's block-by-block forward, SlimGPT and
BlockPruner end to end, the slim format (save, reload in-process and via trust_remote_code, KV
cache with attention-free layers in a hybrid sliding/full cache) and the exports.

The model mixes sliding-window and full layers with a window (8) shorter than every test sequence,
so wrong masks or the wrong rotary base per layer type change the logits; its norms are random
(stock init makes every ``1 + w`` norm the identity, which would hide a misplaced norm) and its
embeddings untied (tied ones make greedy decoding repeat the prompt's last token, which would hide
a broken cache).
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from conftest import build_tiny
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.cli import main
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces, run_layerwise
from slimgpt.errors import ModelError
from slimgpt.io import load_pruned, save_pruned
from slimgpt.methods.blockpruner import BlockChain, block_params, chain_nll
from slimgpt.methods.slimgpt import SlimGPT
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerWidth
from slimgpt.surgery import layer_shapes, parameter_count, shrink_model
from test_io import load_without_slimgpt

DEV = torch.device("cpu")
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=LAYER_TYPES, sliding_window=8,
             query_pre_attn_scalar=24, final_logit_softcapping=3.0, tie_word_embeddings=False, pad_token_id=0)
H, D, FF = 64, 16, 96  # hidden, head_dim, FFN channels (hidden and FFN from conftest.TINY)
IDS = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8, 77, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
MASK = torch.tensor([[1] * 12, [0] * 3 + [1] * 9])  # left padding in row 1
GENERATE = dict(attention_mask=MASK, max_new_tokens=10, min_new_tokens=10, do_sample=False)


def tiny_gemma3(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    model = build_tiny(Gemma3TextConfig, Gemma3ForCausalLM, seed, **{**GEMMA, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    return model


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def block_logits(model: torch.nn.Module, ids: torch.Tensor, swap: str | None = None) -> torch.Tensor:
    """embed → attention_block / mlp_block per layer → logits, through the adapter. ``swap``
    replaces one context entry by the other layer type's (to show that both matter)."""
    ad = get_adapter(model)
    ctx = ad.context(ids.shape[1], DEV, torch.float32)
    if swap is not None:
        other = {"full_attention": "sliding_attention", "sliding_attention": "full_attention"}
        for kind in ctx.by_type:
            ctx.by_type[kind] = {**ctx.by_type[kind], swap: ctx.by_type[other[kind]][swap]}
    with torch.no_grad():
        h = ad.embed(ids)
        for layer in ad.layers:
            h = ad.mlp_block(layer, ad.attention_block(layer, h, ctx))
        return ad.logits(h)


def zero_pruned(model: torch.nn.Module, plans: dict[int, LayerPlan]) -> None:
    """Zero the o_proj columns of removed heads and the down_proj columns of removed channels."""
    with torch.no_grad():
        for i, plan in plans.items():
            layer = model.model.layers[i]
            if plan.kept_heads is not None:
                for h in set(range(4)) - set(plan.kept_heads):
                    layer.self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
            if plan.kept_channels is not None:
                layer.mlp.down_proj.weight[:, sorted(set(range(FF)) - set(plan.kept_channels))] = 0


def headless_plans(seed: int = 0) -> dict[int, LayerPlan]:
    """Layer 0 (the first sliding layer) and layer 1 (the first full layer) lose every head, so the
    cache reads both mask sizes from placeholders; layer 2 keeps one query head per key/value
    group, layer 3 loses its MLP, layer 0 keeps a random subset of channels."""
    rng = random.Random(seed)
    return {0: LayerPlan(kept_heads=[], kept_channels=sorted(rng.sample(range(FF), 40))),
            1: LayerPlan(kept_heads=[]),
            2: LayerPlan(kept_heads=[rng.randrange(2), 2 + rng.randrange(2)]),
            3: LayerPlan(kept_channels=[])}


def skipped(model: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """A copy whose residual blocks ``blocks`` (2i attention, 2i+1 MLP) have zero output weights."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for b in blocks:
            layer = m.model.layers[b // 2]
            (layer.self_attn.o_proj if b % 2 == 0 else layer.mlp.down_proj).weight.zero_()
    return m


# ---- (a) the adapter ---------------------------------------------------------------------------------


def test_block_forward_equals_stock_model() -> None:
    model = tiny_gemma3()
    ids = calib_ids(2, 24, seed=3)
    ref = logits(model, ids)
    torch.testing.assert_close(block_logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    # the test model exercises what the context must get right per layer type
    for what in ("attention_mask", "position_embeddings"):
        assert (block_logits(model, ids, swap=what) - ref).abs().max() > 1e-2, what
    # final_logit_softcapping is applied (and changes this model's logits)
    model.config.final_logit_softcapping = None
    uncapped = logits(model, ids)
    assert (uncapped - ref).abs().max() > 1e-2
    torch.testing.assert_close(block_logits(model, ids), uncapped, atol=1e-5, rtol=1e-5)


def test_parameter_accounting_matches_surgery() -> None:
    model = tiny_gemma3()
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    # q rows + o columns per query head, k + v rows per key/value head, gate/up rows + down column
    # per channel; q_norm / k_norm act over head_dim and stay with any number of heads
    assert {(s.per_q_head, s.per_kv_head, s.per_channel) for s in spaces} == {(2 * D * H, 2 * D * H, 3 * H)}
    plans = headless_plans()
    zero_pruned(model, plans)
    dense = parameter_count(model)
    slim = shrink_model(model, plans)
    removed = 0
    for s, shape in zip(spaces, layer_shapes(slim)):
        removed += ((s.num_heads - shape["heads"]) * s.per_q_head + (s.num_kv_heads - shape["kv_heads"]) * s.per_kv_head
                    + (s.channels - shape["channels"]) * s.per_channel)
    assert dense - parameter_count(slim) == removed
    assert layer_shapes(slim) == [{"heads": 0, "kv_heads": 0, "channels": 40}, {"heads": 0, "kv_heads": 0, "channels": FF},
                                  {"heads": 2, "kv_heads": 2, "channels": FF}, {"heads": 4, "kv_heads": 2, "channels": 0}]
    assert all(len(layer.self_attn.q_norm.weight) == D for layer in slim.model.layers)


def test_bidirectional_models_are_refused() -> None:
    model = tiny_gemma3(use_bidirectional_attention=True)
    with pytest.raises(ModelError, match="bidirectionally"):
        get_adapter(model)


# ---- (b) SlimGPT end to end --------------------------------------------------------------------------


def test_slimgpt_prune_save_and_reload(tiny_tokenizer, calib_file, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    cfg = PruneConfig(model="tiny", out=str(out), ratio=0.3, calib=calib_file, nsamples=8, seqlen=32, batch_size=4)
    res = prune(cfg, model=tiny_gemma3(), tokenizer=tiny_tokenizer, progress=False)
    slim = res.model
    assert type(slim).__name__ == "SlimGemma3ForCausalLM" and slim.config.model_type == "slimgpt_gemma3"
    assert abs(res.report["params"]["removed_ratio"] - 0.3) < 0.01
    assert res.report["params"]["pruned"] == parameter_count(slim)
    assert any(s["heads"] < 4 for s in layer_shapes(slim)) and any(s["channels"] < FF for s in layer_shapes(slim))
    ref = logits(slim)
    torch.testing.assert_close(block_logits(slim, IDS), ref, atol=1e-5, rtol=1e-5)  # the adapter on the slim type

    again, tok = load_pruned(out)
    assert type(again) is type(slim) and layer_shapes(again) == layer_shapes(slim)
    assert torch.equal(logits(again), ref)
    assert tok("t5 t17")["input_ids"] == [5, 17]

    # a process that never imports slimgpt: the copied modelling files alone
    child = load_without_slimgpt(out, IDS, MASK, tmp_path)
    assert "transformers_modules" in child["cls"]
    assert torch.equal(child["logits"], ref)
    kw = dict(attention_mask=MASK, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(child["tokens"], slim.generate(IDS, **kw))


# ---- (c) keeping everything ----------------------------------------------------------------------------


def test_keep_everything_is_identity() -> None:
    model = tiny_gemma3()
    before = logits(model)
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    keep_all = [LayerWidth(0, 0, s.channels, 0.0) for s in spaces]
    res = run_layerwise(ad, calib_ids(), SlimGPT(), keep_all, spaces, DEV, batch_size=4, progress=False)
    assert torch.equal(logits(shrink_model(model, res.plans)), before)

    model = tiny_gemma3()
    full = {i: LayerPlan(kept_heads=list(range(4)), kept_channels=list(range(FF))) for i in range(4)}
    slim = shrink_model(model, full)
    assert type(slim).__name__ == "SlimGemma3ForCausalLM"
    assert torch.equal(logits(slim), before)


# ---- (d) BlockPruner -------------------------------------------------------------------------------------


def test_block_chain_perplexity_equals_full_forward() -> None:
    """The search's NLL of a model with blocks removed (through the adapter) equals a plain forward
    of the model with those blocks' outputs zeroed."""
    model = tiny_gemma3()
    ids = calib_ids(6, 24)
    chain = BlockChain(get_adapter(model), ids.shape[1], DEV)
    for removed in ([], [0], [3, 4]):
        present = [b for b in range(8) if b not in removed]
        nll = chain_nll(chain, list(ids.split(4)), present)
        ref = logits(skipped(model, removed), ids)
        ref_nll = F.cross_entropy(ref[:, :-1].reshape(-1, 128).double(), ids[:, 1:].reshape(-1), reduction="sum")
        assert math.isclose(nll, float(ref_nll), rel_tol=1e-5), removed


def test_blockpruner_removes_two_blocks(tiny_tokenizer, calib_file, tmp_path: Path) -> None:
    model = tiny_gemma3()
    dense = copy.deepcopy(model)
    out = tmp_path / "bp"
    cfg = PruneConfig(model="tiny", out=str(out), method="blockpruner", blocks=2, calib=calib_file, nsamples=8,
                      seqlen=32, batch_size=4, search_dtype="float32")
    res = prune(cfg, model=model, tokenizer=tiny_tokenizer, progress=False)
    names = res.report["method"]["search"]["removed"]
    blocks = sorted(int(n.split(".")[0]) * 2 + n.endswith("mlp") for n in names)
    assert len(blocks) == 2
    shapes = layer_shapes(res.model)
    gone = [b for b in range(8) if (shapes[b // 2]["heads"] if b % 2 == 0 else shapes[b // 2]["channels"]) == 0]
    assert gone == blocks
    spaces = layer_spaces(get_adapter(dense))
    assert parameter_count(dense) - parameter_count(res.model) == sum(block_params(spaces, b) for b in blocks)
    ref = logits(skipped(dense, blocks))
    torch.testing.assert_close(logits(res.model), ref, atol=1e-5, rtol=1e-5)
    reloaded, _ = load_pruned(out)
    assert torch.equal(logits(reloaded), logits(res.model))


def test_cli_streamed_run_equals_in_memory_run(tiny_tokenizer, tmp_path: Path) -> None:
    """A Gemma 3 model folder through ``slimgpt prune``, in memory and streamed layer by layer
    (``--max-memory``): bitwise the same weights."""
    from test_streaming import RUN, assert_same_weights, calib_text

    src = tmp_path / "src"
    tiny_gemma3().save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    calib = calib_text(tmp_path / "calib.txt")
    assert main(["prune", str(src), "--out", str(tmp_path / "mem"), "--calib", str(calib), *RUN]) == 0
    assert main(["prune", str(src), "--out", str(tmp_path / "streamed"), "--calib", str(calib), *RUN,
                 "--max-memory", "1KiB"]) == 0
    assert_same_weights(tmp_path / "mem", tmp_path / "streamed")
    model, _ = load_pruned(tmp_path / "streamed")
    assert model.config.model_type == "slimgpt_gemma3" and parameter_count(model) < 0.75 * parameter_count(tiny_gemma3())


# ---- (e) generation with the KV cache --------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_matches_without(attn: str) -> None:
    dense = tiny_gemma3()
    plans = headless_plans()
    zero_pruned(dense, plans)
    slim = shrink_model(copy.deepcopy(dense), plans)
    assert slim.config.layer_num_attention_heads[:2] == [0, 0]
    for m in (slim, dense):
        m.config._attn_implementation = attn
    cache = slim(IDS, use_cache=True).past_key_values
    assert cache.get_seq_length() == IDS.shape[1] and cache.layers[0].is_sliding and not cache.layers[1].is_sliding
    cached = slim.generate(IDS, **GENERATE)
    new = cached[:, IDS.shape[1]:]
    assert cached.shape == (2, IDS.shape[1] + 10) and len(set(new.flatten().tolist())) > 6  # not a repeated token
    assert torch.equal(cached, slim.generate(IDS, use_cache=False, **GENERATE))
    assert torch.equal(cached, slim.generate(IDS, cache_implementation="static", **GENERATE))
    assert torch.equal(cached, dense.generate(IDS, **GENERATE))
    # token-by-token decoding past the sliding window gives the full forward's logits
    ids = calib_ids(1, 20, seed=4)
    with torch.no_grad():
        full = slim(ids).logits
        past, steps = None, []
        for t in range(ids.shape[1]):
            o = slim(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            steps.append(o.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# ---- exports ---------------------------------------------------------------------------------------------


def test_exports(tiny_tokenizer, tmp_path: Path, capsys) -> None:
    from slimgpt.export import export
    from slimgpt.export.padded import to_padded

    model = tiny_gemma3()
    plans = headless_plans(1)
    zero_pruned(model, plans)
    slim = shrink_model(model, plans)
    ref = logits(slim)

    padded = to_padded(slim)
    assert type(padded) is Gemma3ForCausalLM
    assert all(layer.self_attn.o_proj.in_features == 4 * D and layer.mlp.down_proj.in_features == FF
               for layer in padded.model.layers)
    torch.testing.assert_close(logits(padded), ref, atol=1e-5, rtol=1e-5)

    folder = save_pruned(slim, tiny_tokenizer, tmp_path / "slim", {})
    capsys.readouterr()
    assert main(["export", str(folder), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # a progress bar may come first
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], lines
    assert lines[-1].startswith("slimgpt: error: GGUF export cannot express Gemma 3"), lines
    assert not (tmp_path / "m.gguf").exists()

    ort = pytest.importorskip("onnxruntime")
    out = export(slim, tiny_tokenizer, "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for ids in (IDS, calib_ids(3, 17, seed=2)):  # longer than the sliding window
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        assert np.allclose(got, logits(slim, ids).numpy(), atol=1e-4)
