"""The layer-wise driver, SlimGPT method, surgery and save format together, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces, run_layerwise
from slimgpt.methods.slimgpt import SlimGPT
from slimgpt.schedule import LayerWidth, solve_widths
from slimgpt.surgery import layer_shapes, parameter_count, shrink_model

DEV = torch.device("cpu")


def calib_ids(n=16, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def logits(model, ids=None):
    ids = calib_ids(2, 24, seed=99) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_gqa", "tiny_qwen2"])
def test_nothing_removed_gives_identical_logits(fixture, request):
    model = request.getfixturevalue(fixture)
    before = logits(model)
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    keep_all = [LayerWidth(0, 0, s.channels, 0.0) for s in spaces]
    res = run_layerwise(ad, calib_ids(), SlimGPT(), keep_all, spaces, DEV, batch_size=4, progress=False)
    pruned = shrink_model(model, res.plans)
    assert torch.equal(logits(pruned), before)


@pytest.mark.parametrize("fixture", ["tiny_llama_gqa", "tiny_qwen2"])
@pytest.mark.parametrize("score", ["gcd", "gcd-exact", "initial"])
def test_shrunk_equals_compensated_unshrunk(fixture, score, request):
    model = request.getfixturevalue(fixture)
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    widths = solve_widths(spaces, parameter_count(model), 0.3, "log")
    res = run_layerwise(ad, calib_ids(), SlimGPT(head_score=score), widths, spaces, DEV, batch_size=4, progress=False)
    unshrunk = copy.deepcopy(model)
    pruned = shrink_model(model, res.plans)
    torch.testing.assert_close(logits(pruned), logits(unshrunk), atol=1e-5, rtol=1e-5)
    shapes = layer_shapes(pruned)
    for s, w, shape in zip(spaces, widths, shapes):
        assert shape["heads"] == w.heads(s) and shape["channels"] == w.channels
    assert abs((parameter_count(unshrunk) - parameter_count(pruned)) - 0.3 * parameter_count(unshrunk)) < 3 * 64


def test_compensation_beats_plain_removal(tiny_llama_gqa):
    """OBS compensation must lower the error of the final hidden states against the dense model,
    compared with removing the same heads and channels without compensation."""
    dense = copy.deepcopy(tiny_llama_gqa)
    model = tiny_llama_gqa
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    widths = solve_widths(spaces, parameter_count(model), 0.25, "uniform")
    calib = calib_ids(32, 32)
    res = run_layerwise(ad, calib, SlimGPT(), widths, spaces, DEV, batch_size=8, progress=False)
    plain = copy.deepcopy(dense)
    pad = get_adapter(plain)
    for i, plan in res.plans.items():
        layer = pad.layers[i]
        d = pad.geometry(layer).head_dim
        o, down = pad.attention(layer).o, pad.mlp(layer).down
        with torch.no_grad():
            if plan.kept_heads is not None:
                drop = [c for c in range(o.in_features) if c // d not in plan.kept_heads]
                o.weight[:, drop] = 0
            if plan.kept_channels is not None:
                drop = [c for c in range(down.in_features) if c not in plan.kept_channels]
                down.weight[:, drop] = 0
    ids = calib_ids(8, 32, seed=1)  # held-out windows

    def hidden(m):
        with torch.no_grad():
            return m(ids, output_hidden_states=True).hidden_states[-1]

    ref = hidden(dense)
    err_obs = (hidden(model) - ref).pow(2).mean()
    err_plain = (hidden(plain) - ref).pow(2).mean()
    assert err_obs < 0.8 * err_plain


def test_api_prune_save_reload_and_generate(tiny_llama_gqa, tiny_tokenizer, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    cfg = PruneConfig(model="tiny", out=str(out), ratio=0.3, calib=calib_file, nsamples=8, seqlen=32, batch_size=4)
    res = prune(cfg, model=tiny_llama_gqa, tokenizer=tiny_tokenizer, progress=False)
    rep = res.report
    assert abs(rep["params"]["removed_ratio"] - 0.3) < 0.01
    assert rep["params"]["pruned"] == parameter_count(res.model)
    assert len(rep["layers"]) == 4 and rep["time_s"]["solver"] > 0
    # what no bucket timed: never negative (a bucket counting time outside the prune would make it so)
    assert 0 <= rep["time_s"]["other"] < rep["time_s"]["prune_total"]
    assert (out / "slimgpt.json").is_file() and not list(tmp_path.glob("*.tmp*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded), logits(res.model), atol=0, rtol=0)
    ids = calib_ids(1, 8, seed=5)
    g1 = reloaded.generate(ids, max_new_tokens=6, do_sample=False)
    g2 = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


def test_same_seed_gives_bitwise_same_weights(tiny_qwen2, tiny_tokenizer, calib_file):
    def run(model):
        cfg = PruneConfig(model="tiny", ratio=0.4, calib=calib_file, nsamples=8, seqlen=32, seed=3)
        return prune(cfg, model=model, tokenizer=tiny_tokenizer, progress=False).model.state_dict()

    a = run(copy.deepcopy(tiny_qwen2))
    b = run(tiny_qwen2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_original_output_propagation_differs_but_runs(tiny_llama):
    ad_a = get_adapter(copy.deepcopy(tiny_llama))
    ad_b = get_adapter(tiny_llama)
    spaces = layer_spaces(ad_a)
    widths = solve_widths(spaces, parameter_count(tiny_llama), 0.3, "log")
    ra = run_layerwise(ad_a, calib_ids(), SlimGPT(), widths, spaces, DEV, propagate="pruned", progress=False)
    rb = run_layerwise(ad_b, calib_ids(), SlimGPT(), widths, spaces, DEV, propagate="original", progress=False)
    assert ra.plans[0].kept_channels == rb.plans[0].kept_channels  # layer 0 sees the same inputs
    last = max(ra.plans)
    w_a = ad_a.mlp(ad_a.layers[last]).down.weight
    w_b = ad_b.mlp(ad_b.layers[last]).down.weight
    assert not torch.equal(w_a, w_b)


class _RecordMlpHessian(SlimGPT):
    """SlimGPT that keeps the FFN Hessian each layer's channel solve received."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, torch.Tensor] = {}

    def prune_layer(self, run, width, space):
        inner = run.mlp_hessian

        def record() -> torch.Tensor:
            H = inner()
            self.seen[run.index] = H.clone()
            return H

        run.mlp_hessian = record
        return super().prune_layer(run, width, space)


@pytest.mark.parametrize("propagate", ["original", "pruned"])
def test_ffn_hessian_is_taken_after_the_pruned_attention(tiny_llama, propagate):
    """The FFN solve must see the attention *after* its heads went (ALGORITHMS.md §6), whichever
    inputs are propagated: with ``original`` the driver has already run the dense layer once,
    and a cache of the dense attention output must not survive SlimGPT's edit of o_proj."""
    dense = copy.deepcopy(tiny_llama)
    ad = get_adapter(tiny_llama)
    spaces = layer_spaces(ad)
    widths = [LayerWidth(0, 1, s.channels - 24, 0.3) for s in spaces]  # one head per kv group goes
    method = _RecordMlpHessian()
    calib = calib_ids()
    res = run_layerwise(ad, calib, method, widths, spaces, DEV, batch_size=4, propagate=propagate, progress=False)
    assert all(len(p.kept_heads) == 4 for p in res.plans.values())
    # Reference, independent of the runner: the dense model with layer i's attention swapped for
    # the pruned one; layer i's inputs are then the dense ones (original propagation) and the
    # layers before it are the pruned ones (pruned propagation).
    for i in (0, 1):
        ref = copy.deepcopy(dense if propagate == "original" else tiny_llama)
        ref.model.layers[i].self_attn = copy.deepcopy(tiny_llama.model.layers[i].self_attn)
        xs: list[torch.Tensor] = []
        down = ref.model.layers[i].mlp.down_proj
        h = down.register_forward_pre_hook(lambda _m, a, xs=xs: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            ref(calib)
        h.remove()
        X = torch.cat(xs).double()
        H_ref = 2 * X.T @ X / X.shape[0]
        torch.testing.assert_close(method.seen[i].double(), H_ref, rtol=1e-4, atol=1e-6)


def test_runner_cache_notices_writes_through_data(tiny_llama):
    """``.data`` writes bump no version counter; the cached attention outputs must still go."""
    from slimgpt.runner import LayerRunner, Timer

    ad = get_adapter(tiny_llama)
    layer = ad.layers[0]
    ctx = ad.context(32, DEV, torch.float32)
    inputs = [ad.embed(calib_ids(4, 32))]
    run = LayerRunner(0, layer, ad, inputs, ctx, DEV, Timer())
    before = run.attention_outputs()[0].clone()
    assert run.attention_outputs()[0] is run.attention_outputs()[0]  # cached while unchanged
    o = ad.attention(layer).o
    version = o.weight._version
    o.weight.data[:, :8] = 0  # head 0 gone, written as solvers do
    assert o.weight._version == version
    after = run.attention_outputs()[0]
    fresh = LayerRunner(0, layer, ad, inputs, ctx, DEV, Timer()).attention_outputs()[0]
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_slimgpt_removes_dead_channels_first_at_no_cost(tiny_llama):
    """FFN channels whose up_proj row is zero never fire: SlimGPT must remove them first, with an
    error of exactly 0, even when their down_proj columns are large."""
    ad = get_adapter(tiny_llama)
    mlp = ad.mlp(ad.layers[0])
    with torch.no_grad():
        mlp.up.weight[[5, 17]] = 0
        mlp.down.weight[:, [5, 17]] *= 10
    spaces = layer_spaces(ad)
    widths = [LayerWidth(0, 0, s.channels - 2 * (i == 0), 0.0) for i, s in enumerate(spaces)]
    res = run_layerwise(ad, calib_ids(), SlimGPT(ffn_groups=1), widths, spaces, DEV, batch_size=4, progress=False)
    plan = res.plans[0]
    assert 5 not in plan.kept_channels and 17 not in plan.kept_channels
    assert plan.stats["mlp_error"] == 0.0


def test_timer_waits_for_the_gpu_on_cuda_only(monkeypatch):
    """CUDA kernels run asynchronously: a bucket must synchronise when it opens and closes, or it
    times only the launches. On CPU it must not touch CUDA at all."""
    from slimgpt.runner import Timer

    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    gpu = Timer(torch.device("cuda", 0))
    with gpu("forward"):
        assert calls == [torch.device("cuda", 0)]
    with gpu("solver"):
        pass
    assert len(calls) == 4 and set(gpu.seconds) == {"forward", "solver"}
    calls.clear()
    cpu = Timer(torch.device("cpu"))
    with cpu("forward"):
        pass
    with Timer()("forward"):
        pass
    assert calls == [] and cpu.seconds["forward"] >= 0


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_bf16_on_gpus_that_have_it(monkeypatch, bf16, expected):
    """Gemma and Qwen2.5 overflow float16; ``auto`` must not pick it on a GPU with bfloat16, and
    stays float32 on CPU whatever CUDA reports."""
    from slimgpt.utils import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype(None, torch.device("cuda", 0)) == expected
    assert resolve_dtype("auto", DEV) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16
