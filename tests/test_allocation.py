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
from slimgpt.errors import ConfigError
from slimgpt.schedule import LayerSpace, removed_params, round_layer, solve_widths
from slimgpt.solvers.heads import prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.solvers.obs import column_errors, remove_columns
from slimgpt.surgery import parameter_count


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


def _independent_kl(model, calib_h: torch.Tensor, calib_s: torch.Tensor, widths, settings, family) -> list[float]:
    """The candidate's model built with zeroed (not sliced) weights from Hessians collected by
    plain forward hooks on the dense model, then KL(dense || candidate) by F.kl_div over all tokens
    of each scoring window (the dense probabilities rounded to float16, as they are kept). The FFN's greedy path steps through the grid and
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
    per_window = []
    with torch.no_grad():
        for win in calib_s.split(1):
            p16 = F.softmax(dense(win).logits[0].float(), -1).half().float()  # the dense p as the scoring keeps it
            logq = F.log_softmax(pruned(win).logits[0].float(), -1)
            per_window.append(float(F.kl_div(logq, p16, reduction="batchmean")))
    return per_window


def test_scores_are_the_kl_of_each_candidate_and_the_lowest_wins():
    torch.manual_seed(0)
    model = _model()
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    calib = _calib()
    fam = candidates(spaces, model.num_parameters(), 0.3)
    st = AutoSettings(hessian_windows=5, score_at=[5, 6, 7], batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = choose_allocation(adapter, calib, spaces, fam, torch.device("cpu"), st, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert set(res.scores) == set(fam)
    for name, widths in fam.items():
        ref = _independent_kl(model, calib[:5], calib[5:8], widths, st, fam)
        assert res.window_scores[name] == pytest.approx(ref, rel=1e-4, abs=1e-7), name
        assert res.scores[name] == pytest.approx(sum(ref) / 3, rel=1e-4, abs=1e-7), name
    assert res.scores[res.chosen] == min(res.scores.values())
    assert res.widths == fam[res.chosen]
    assert len(set(round(v, 6) for v in res.scores.values())) > 1  # the candidates really differ
    w = res.settings["windows"]
    assert w["hessian"] == [0, 5] and w["score"] == [5, 6, 7] and w["disjoint"]


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


def test_auto_windows_cover_the_widest_ffn_and_never_overlap():
    s = [LayerSpace(32, 8, 14336, 1, 1, 1)]
    hess, score = auto_windows(256, 2048, s)
    assert hess == 64 and score == 4
    hess, score = auto_windows(64, 512, [LayerSpace(14, 2, 4864, 1, 1, 1)])
    assert hess * 512 >= 2 * 4864 and score == 4
    assert auto_windows(64, 128, [LayerSpace(9, 3, 1536, 1, 1, 1)]) == (24, 16)  # 2,048 scoring tokens
    for n in (2, 3, 4, 8, 12, 64, 256):
        for seqlen in (32, 128, 512, 2048):
            hess, score = auto_windows(n, seqlen, s)
            assert hess >= 1 and score >= 1 and hess + score <= n, (n, seqlen)  # the pipeline scores after them
    assert auto_windows(4, 512, s) == (3, 1)
    with pytest.raises(ConfigError, match="--nsamples 2"):
        auto_windows(1, 512, s)


# ---------------------------------------------------------------------------------- the prune builds the choice
def _shapes_of(widths, spaces) -> list[tuple[str, str, str]]:
    return [(f"{w.heads(s)}/{s.num_heads}", f"{w.kv_heads(s)}/{s.num_kv_heads}", f"{w.channels}/{s.channels}")
            for w, s in zip(widths, spaces)]


@pytest.mark.parametrize("streamed", [False, True])
def test_auto_prune_builds_the_chosen_candidate(streamed, tmp_path):
    """Each layer of the saved model has the kept heads and channels of the candidate ``auto`` chose
    (from the family rebuilt here, not read back from the run), in memory and streamed from disk."""
    from test_streaming import calib_text, save_tiny

    src, calib = save_tiny(tmp_path / "src", "llama_bias"), calib_text(tmp_path / "calib.txt")
    cfg = PruneConfig(model=str(src), out=str(tmp_path / "out"), calib=str(calib), ratio=0.4, nsamples=12, seqlen=32,
                      batch_size=4, device="cpu", max_memory="1KiB" if streamed else None)
    rep = prune(cfg, progress=False).report
    assert rep["streamed"] == streamed
    auto = rep["method"]["auto"]
    model = LlamaForCausalLM.from_pretrained(src)
    spaces = layer_spaces(get_adapter(model))
    family = candidates(spaces, parameter_count(model), 0.4)
    assert auto["chosen"] != "log" and set(auto["kl"]) == set(family)  # (a log choice would not tell them apart)
    assert _shapes_of(family[auto["chosen"]], spaces) != _shapes_of(family["log"], spaces)
    built = [(r["heads"], r["kv_heads"], r["channels"]) for r in rep["layers"]]
    assert built == _shapes_of(family[auto["chosen"]], spaces)


def test_auto_scoring_windows_are_disjoint_from_the_hessian_windows(calib_file, tiny_tokenizer, monkeypatch):
    """The run scores on calibration windows after the Hessian windows, and records them; the
    candidates' variants depend on the Hessian windows only (new tokens in the scoring windows
    change the scores, not one variant; new tokens in a Hessian window change the variants)."""
    import slimgpt.allocation as allocation

    seen = {}
    real = allocation.choose_allocation

    def spy(adapter, calib, spaces, family, device, settings, **kw):
        seen.update(calib=calib.clone(), settings=settings)
        return real(adapter, calib, spaces, family, device, settings, **kw)

    monkeypatch.setattr(allocation, "choose_allocation", spy)
    res = prune(PruneConfig(model="tiny", calib=calib_file, ratio=0.3, nsamples=12, seqlen=32, batch_size=4,
                            device="cpu"), model=_model(), tokenizer=tiny_tokenizer, progress=False)
    st, calib = seen["settings"], seen["calib"]
    assert calib.shape[0] == 12 and st.score_at and not set(st.score_at) & set(range(st.hessian_windows))
    assert max(st.score_at) < calib.shape[0]
    w = res.report["method"]["auto"]["windows"]
    assert w == {"hessian": [0, st.hessian_windows], "score": st.score_at, "disjoint": True, "tokens_per_window": 32,
                 "calibration_seed": 0}
    assert len(res.report["method"]["auto"]["kl_by_window"]["log"]) == len(st.score_at)

    variants = []
    real_variants = allocation._layer_variants

    def keep(*a, **k):
        out = real_variants(*a, **k)
        variants.append({n: (v.heads, v.o_weight, v.channels, v.down_weight) for n, v in out.items()})
        return out

    monkeypatch.setattr(allocation, "_layer_variants", keep)
    model = _model()
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    fam = candidates(spaces, model.num_parameters(), 0.3)
    st = AutoSettings(6, [6, 7], batch_size=4)
    base = _calib(8)

    def variants_and_scores(calib):
        variants.clear()
        r = real(adapter, calib, spaces, fam, torch.device("cpu"), st, progress=False)
        return list(variants), r.scores

    def same(a, b) -> bool:
        return all(x[n][0] == y[n][0] and x[n][2] == y[n][2]
                   and all((p is None and q is None) or torch.equal(p, q) for p, q in ((x[n][1], y[n][1]), (x[n][3], y[n][3])))
                   for x, y in zip(a, b, strict=True) for n in x)

    v0, s0 = variants_and_scores(base)
    other = base.clone()
    other[6:] = _calib(2, seed=7)
    v1, s1 = variants_and_scores(other)
    assert same(v0, v1) and s0 != s1
    other = base.clone()
    other[2] = _calib(1, seed=8)[0]
    v2, _ = variants_and_scores(other)
    assert not same(v0, v2)


def test_auto_pass_runs_one_dense_pass_per_layer(monkeypatch):
    """Hessians and dense outputs come from LayerRunner.dense_pass, once per layer; none of the
    separate passes (attention Hessian, MLP Hessian, outputs) runs."""
    from slimgpt.runner import LayerRunner

    calls = []
    real = LayerRunner.dense_pass
    monkeypatch.setattr(LayerRunner, "dense_pass", lambda self: calls.append(self.index) or real(self))
    for name in ("attention_hessian", "mlp_hessian", "outputs", "attention_outputs"):
        monkeypatch.setattr(LayerRunner, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran"))
    model = _model()
    adapter = get_adapter(model)
    spaces = layer_spaces(adapter)
    fam = candidates(spaces, model.num_parameters(), 0.3)
    choose_allocation(adapter, _calib(8), spaces, fam, torch.device("cpu"), AutoSettings(6, [6, 7], batch_size=4),
                      progress=False)
    assert calls == list(range(adapter.num_layers))


# ---------------------------------------------------------------------------------- one way to cut a layer
def test_layer_swap_cuts_as_the_saved_model_and_restores(tiny_qwen2):
    """A temporary cut (kept heads and channels, output columns given apart) computes what the
    saved model computes for the same plan, sets the head counts through the adapter, and restore
    puts the very dense tensors back."""
    from slimgpt.plan import LayerPlan
    from slimgpt.surgery import LayerSwap, shrink_model

    model = tiny_qwen2
    ad = get_adapter(model)
    ids = _calib(2, 16, seed=3)
    with torch.no_grad():
        dense = model(ids).logits
    params = {n: p for n, p in model.named_parameters()}
    heads, channels = [0, 1, 4, 5], [c for c in range(96) if c % 3]  # 2 of 4 heads in each key/value group
    g = torch.Generator().manual_seed(0)
    o_w = torch.randn(64, len(heads) * 8, generator=g) * 0.1
    d_w = torch.randn(64, len(channels), generator=g) * 0.1
    swap = LayerSwap(ad, 1)
    swap.cut(heads=heads, o_weight=o_w, channels=channels, down_weight=d_w)
    attn = model.model.layers[1].self_attn
    assert attn.num_key_value_groups == 2 and attn.q_proj.weight.shape[0] == 32
    with torch.no_grad():
        cut = model(ids).logits
    swap.restore()
    assert attn.num_key_value_groups == 4 and all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)

    ref = copy.deepcopy(model)  # the saved model's way: weights written in place, then surgery
    layer = ref.model.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        cols = torch.tensor([h * 8 + d for h in heads for d in range(8)])
        layer.self_attn.o_proj.weight[:, cols] = o_w
        layer.mlp.down_proj.weight.zero_()
        layer.mlp.down_proj.weight[:, channels] = d_w
        slim = shrink_model(ref, {1: LayerPlan(heads, channels)})
        torch.testing.assert_close(slim(ids).logits, cut, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cut, dense, atol=1e-3)


# ---------------------------------------------------------------------------------- pruning at given widths
def test_a_widths_file_prunes_at_exactly_those_widths(calib_file, tiny_tokenizer, tmp_path):
    """``--schedule FILE`` with per-layer widths (a run's allocation.json, or a plain list) builds
    the model the auto run built from the same widths, bit for bit."""
    import json

    base = dict(model="tiny", calib=calib_file, ratio=0.3, nsamples=12, seqlen=32, batch_size=4, device="cpu")
    auto = prune(PruneConfig(**base), model=_model(), tokenizer=tiny_tokenizer, progress=False)
    model = _model()
    spaces = layer_spaces(get_adapter(model))
    widths = candidates(spaces, model.num_parameters(), 0.3)[auto.report["method"]["auto"]["chosen"]]
    plain = tmp_path / "widths.json"
    plain.write_text(json.dumps([{"remove_groups": w.remove_groups, "remove_per_group": w.remove_per_group,
                                  "channels": w.channels} for w in widths]))
    wrapped = tmp_path / "allocation.json"
    wrapped.write_text(json.dumps({"widths": [vars(w) for w in widths], "chosen": "x"}))
    for f in (plain, wrapped):
        fixed = prune(PruneConfig(**{**base, "schedule": str(f)}), model=_model(), tokenizer=tiny_tokenizer,
                      progress=False)
        assert "auto" not in fixed.report["method"]
        assert [(r["heads"], r["kv_heads"], r["channels"]) for r in fixed.report["layers"]] == _shapes_of(widths, spaces)
        a, b = auto.model.state_dict(), fixed.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("doc, match", [
    ([{"remove_groups": 0, "remove_per_group": 0, "channels": 96}] * 3, "has 3 layers but the model has 4"),
    ([{"remove_groups": 0, "remove_per_group": 0, "channels": 97}] * 4, "channels within 0..96"),
    ([{"remove_groups": 3, "remove_per_group": 0, "channels": 9}] * 4, "remove_groups within 0..2"),
    ([{"remove_groups": 0, "channels": 9}] * 4, "needs integer remove_groups"),
    ({"chosen": "log"}, "without a \"widths\" list"),
])
def test_a_bad_widths_file_is_refused(doc, match, tmp_path):
    import json

    from slimgpt.allocation import read_widths_file

    f = tmp_path / "w.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        read_widths_file(f, layer_spaces(get_adapter(_model())))
    f.write_text("[0.1, 0.2, 0.3, 0.4]")
    assert read_widths_file(f, layer_spaces(get_adapter(_model()))) is None  # ratios: the schedule file's reader


# ---------------------------------------------------------------------------------- recorded in compare.json
def test_compare_records_the_choice_its_scores_and_windows(calib_file, tiny_tokenizer, tmp_path):
    import json

    from slimgpt.compare import run_compare

    base = PruneConfig(model="tiny", calib=calib_file, nsamples=12, seqlen=32, batch_size=4)
    run_compare("tiny", "0.3", "slimgpt@auto,slimgpt@log", tmp_path, base=base, ppl_dataset=calib_file, ppl_seqlen=32,
                max_windows=2, loaded=(_model(), tiny_tokenizer), progress=False)
    doc = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    a = rows["slimgpt@auto"]["auto"]
    assert a["chosen"] in a["kl"] and a["kl"][a["chosen"]] == min(a["kl"].values()) and len(a["kl"]) > 1
    assert a["windows"]["disjoint"] and a["windows"]["score"] and a["time_s"] > 0
    assert set(a["kl_by_window"]) == set(a["kl"]) and "auto" not in rows["slimgpt@log"]
    md = (tmp_path / "compare.md").read_text()
    assert f"slimgpt@auto at 0.30: chose `{a['chosen']}`" in md and "held out" in md


# ---------------------------------------------------------------------------------- benchmarks/auto_proxy.py
def _bench_proxy():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "auto_proxy.py"
    spec = importlib.util.spec_from_file_location("bench_auto_proxy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spearman_against_a_reference():
    bench = _bench_proxy()
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bench.spearman([1, 2], [1, 2]) is None and bench.spearman([1, 1, 1], [1, 2, 3]) is None
    stats = pytest.importorskip("scipy.stats")
    x, y = [0.3, 0.1, 0.1, 0.7, 0.5, 0.2], [5.0, 2.0, 3.0, 9.0, 9.0, 1.0]  # ties on both sides
    assert bench.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_auto_proxy_benchmark_on_a_tiny_model(tmp_path, monkeypatch):
    """Every candidate scored and built at its widths; the held-out proxy chooses what the prune's
    auto pass chooses; a re-run builds nothing again."""
    import json

    from test_streaming import calib_text, save_tiny

    bench = _bench_proxy()
    src, calib = save_tiny(tmp_path / "src", "llama_bias"), calib_text(tmp_path / "calib.txt")
    args = [str(src), "--ratio", "0.4", "--calib", str(calib), "--nsamples", "12", "--seqlen", "32", "--batch-size",
            "4", "--device", "cpu", "--ppl-dataset", str(calib), "--ppl-seqlen", "32", "--max-windows", "4",
            "--out", str(tmp_path / "res"), "--name", "tiny"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert set(doc["rows"]) == set(doc["family"]) and len(doc["family"]) > 2
    w = doc["windows"]
    assert w["hessian"] == 6 and w["heldout"] == [6, 7, 8] and w["insample"] == [0, 1, 2]
    assert w["heldout6"] == list(range(6, 12)) and w["fresh"] == [12, 13, 14, 15]  # after the 12 calibration windows
    auto = prune(PruneConfig(model=str(src), calib=str(calib), ratio=0.4, nsamples=12, seqlen=32, batch_size=4,
                             device="cpu"), progress=False).report["method"]["auto"]
    assert doc["proxies"]["heldout"]["chosen"] == auto["chosen"]
    assert doc["proxies"]["heldout"]["scores"] == pytest.approx(auto["kl"], abs=2e-6)
    for row in doc["rows"].values():
        assert row["ppl"]["32"] > 1 and row["kl"]["heldout"] > 0 and len(row["kl_by_window"]) == len(w["score_at"])
    proxies = {"heldout", "insample", "heldout6", "fresh"}
    assert set(doc["spearman"]) == proxies | {f"built_{p}" for p in proxies}
    assert all(v is None or -1 <= v <= 1 for v in doc["spearman"].values())
    assert set(doc["spearman_vs_built_kl"]) == proxies
    best = min(r["ppl"]["32"] for r in doc["rows"].values())
    for p, v in doc["regret"].items():  # the chosen candidate's perplexity over the lowest
        assert v == pytest.approx(doc["rows"][doc["proxies"][p]["chosen"]]["ppl"]["32"] / best - 1) and v >= 0
    assert "| candidate |" in (tmp_path / "res" / "tiny.md").read_text()
    monkeypatch.setattr(bench, "prune", lambda *a, **k: pytest.fail("a finished candidate was built again"))
    assert bench.main(args) == 0
    assert json.loads((tmp_path / "res" / "tiny.json").read_text())["rows"] == doc["rows"]
