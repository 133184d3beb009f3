"""``--schedule auto``: the candidate family is on budget, the scores are the KL of the models they
describe (checked against an independent computation), the choice is the lowest, and the run is
deterministic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.allocation import AutoSettings, auto_windows, candidates, choose_allocation
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces
from slimgpt.schedule import LayerSpace, removed_params, round_layer, solve_widths
from slimgpt.solvers.heads import prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.solvers.obs import column_errors, remove_columns


def _model(seed: int = 0):
    return build_tiny(LlamaConfig, LlamaForCausalLM, seed=seed, num_key_value_heads=2, tie_word_embeddings=False)


def _calib(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def test_attn_scale_splits_the_layer_ratio():
    s = LayerSpace(9, 3, 1536, 2 * 64 * 576, 2 * 64 * 576, 3 * 576)
    assert round_layer(s, 0.3, 0.0).remove_groups == 0 and round_layer(s, 0.3, 0.0).remove_per_group == 0
    w = round_layer(s, 0.3, 0.0)
    assert abs((s.params - w.params(s)) - 0.3 * s.params) <= s.per_channel / 2  # the FFN gives the whole layer's share
    w2 = round_layer(s, 0.3, 2.0)
    assert w2.heads(s) < w.heads(s) and w2.channels > w.channels
    assert round_layer(s, 0.3) == round_layer(s, 0.3, None)  # the paper's split is unchanged


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_every_candidate_meets_the_budget(ratio):
    model = _model()
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    total = model.num_parameters()
    fam = candidates(spaces, total, ratio)
    assert "log" in fam and len(fam) >= 3
    assert fam["log"] == solve_widths(spaces, total, ratio, "log")  # the paper's schedule, unchanged
    half = max(s.per_channel for s in spaces) / 2
    for name, w in fam.items():
        assert abs(removed_params(spaces, w) - ratio * total) <= half, name
    shapes = [tuple((w.remove_groups, w.remove_per_group, w.channels) for w in ws) for ws in fam.values()]
    assert len(set(shapes)) == len(shapes)  # no candidate scored twice


def test_ffn_only_is_left_out_when_the_ffns_cannot_give_the_budget():
    model = _model()
    spaces = layer_spaces(get_adapter(model))
    fam = candidates(spaces, model.num_parameters(), 0.7)
    assert not any(n.endswith("-a0") for n in fam)


def _independent_kl(model, calib_h: torch.Tensor, calib_s: torch.Tensor, widths, settings, family) -> float:
    """The candidate's model built with zeroed (not sliced) weights from Hessians collected by
    plain forward hooks on the dense model, then KL(dense || candidate) by F.kl_div over all tokens
    of each scoring window, averaged over windows. The FFN's greedy path steps through the grid and
    every width any candidate of ``family`` needs in that layer (one path serves them all)."""
    dense = model
    pruned = copy.deepcopy(model)
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(dense.model.layers):
        for name, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, a, key=f"{i}.{name}": xs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for w in calib_h.split(settings.batch_size):
            dense(w)
    for h in hooks:
        h.remove()
    cfg = dense.config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for i, (layer, w) in enumerate(zip(pruned.model.layers, widths)):
        if w.remove_groups or w.remove_per_group:
            X = torch.cat(xs[f"{i}.o"]).double()
            H = (2 * X.T @ X / X.shape[0]).float()
            Hinv, _ = damped_inverse(H, settings.damp)
            W = layer.self_attn.o_proj.weight.data.float().clone()
            if (kv - w.remove_groups) * (heads // kv - w.remove_per_group) == 0:
                W.zero_()
            else:
                res = prune_heads(W, Hinv, heads, kv, hd, w.remove_groups, w.remove_per_group, "gcd",
                                  dead=dead_columns(H))
                for h in set(range(heads)) - set(res.kept_heads):
                    W[:, h * hd:(h + 1) * hd] = 0
            layer.self_attn.o_proj.weight.data.copy_(W)
        C = layer.mlp.down_proj.in_features
        if w.channels < C:
            X = torch.cat(xs[f"{i}.down"]).double()
            H = (2 * X.T @ X / X.shape[0]).float()
            Hinv, _ = damped_inverse(H, settings.damp)
            W = layer.mlp.down_proj.weight.data.float().clone()
            if w.channels == 0:
                W.zero_()
            else:  # greedy OBS down the grid of C/64 (at least 8) channels, through w.channels
                step = max(8, -(-C // 64))
                widths_here = {ws[i].channels for ws in family.values()} - {0}
                counts = sorted({*range(C, 0, -step), *widths_here}, reverse=True)
                alive = torch.ones(C, dtype=torch.bool)
                for c in counts[1:counts.index(w.channels) + 1]:
                    err = column_errors(W, Hinv)
                    err[~alive] = torch.inf
                    idx = torch.topk(err, int(alive.sum()) - c, largest=False).indices
                    remove_columns(W, Hinv, idx)
                    alive[idx] = False
                W[:, ~alive] = 0
            layer.mlp.down_proj.weight.data.copy_(W)
    total = 0.0
    with torch.no_grad():
        for win in calib_s.split(1):
            logp = F.log_softmax(dense(win).logits[0].float(), -1)
            logq = F.log_softmax(pruned(win).logits[0].float(), -1)
            total += float(F.kl_div(logq, logp, log_target=True, reduction="batchmean"))
    return total / calib_s.shape[0]


def test_scores_are_the_kl_of_each_candidate_and_the_lowest_wins():
    torch.manual_seed(0)
    model = _model()
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    calib = _calib()
    fam = candidates(spaces, model.num_parameters(), 0.3)
    st = AutoSettings(hessian_windows=8, score_windows=3, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = choose_allocation(adapter, calib, spaces, fam, torch.device("cpu"), st, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert set(res.scores) == set(fam)
    for name, widths in fam.items():
        ref = _independent_kl(model, calib[:8], calib[:3], widths, st, fam)
        assert res.scores[name] == pytest.approx(ref, rel=1e-4, abs=1e-7), name
    assert res.scores[res.chosen] == min(res.scores.values())
    assert res.widths == fam[res.chosen]
    assert len(set(round(v, 6) for v in res.scores.values())) > 1  # the candidates really differ


def test_auto_prune_is_deterministic_and_on_budget(calib_file, tiny_tokenizer):
    reports = []
    for _ in range(2):
        cfg = PruneConfig(model="tiny", calib=calib_file, ratio=0.3, schedule="auto", nsamples=12, seqlen=32,
                          device="cpu", seed=3)
        res = prune(cfg, model=_model(), tokenizer=tiny_tokenizer, progress=False)
        reports.append(res.report)
    a, b = reports
    assert a["method"]["schedule"] == "auto" and a["method"]["auto"]["chosen"] in a["method"]["auto"]["kl"]
    assert a["method"]["auto"]["kl"] == b["method"]["auto"]["kl"]
    assert a["layers"] == b["layers"]
    assert abs(a["params"]["removed_ratio"] - 0.3) < 0.002
    assert a["time_s"]["allocation"] > 0 and a["time_s"]["other"] >= -1e-6


def test_auto_windows_cover_the_widest_ffn():
    s = [LayerSpace(32, 8, 14336, 1, 1, 1)]
    hess, score = auto_windows(256, 2048, s)
    assert hess == 64 and score == 4
    hess, score = auto_windows(64, 512, [LayerSpace(14, 2, 4864, 1, 1, 1)])
    assert hess * 512 >= 2 * 4864 and score == 4
    assert auto_windows(4, 512, s)[0] == 4  # never more than the calibration holds


