"""Searched allocation (--schedule search): budget lattice, database, fitness, search, resume."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces
from slimgpt.errors import ConfigError
from slimgpt.schedule import LayerSpace, LayerWidth, removed_params
from slimgpt.search.database import build_database, ffn_path, ffn_variant_at
from slimgpt.search.evolution import EvoSettings, evolve
from slimgpt.search.fitness import KLFitness, Stitcher
from slimgpt.search.levels import Problem, attention_shapes, make_problem, mutate, widths_for
from slimgpt.solvers.channels import prune_channels
from slimgpt.solvers.hessian import damped_inverse
from slimgpt.surgery import parameter_count, shrink_model

DEV = torch.device("cpu")
# SmolLM2-135M's layers: 9 query / 3 key-value heads of 64, hidden 576, FFN 1536
SMOL = LayerSpace(9, 3, 1536, per_q_head=2 * 64 * 576, per_kv_head=2 * 64 * 576, per_channel=3 * 576)
SMOL_DENSE = 134_515_008


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is 10x faster than two on a busy machine (spin-waits dominate)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def test_attention_levels_are_the_gqa_shapes():
    levels = attention_shapes(SMOL)
    units = [round(r / SMOL.per_q_head) for r, _ in levels]  # q + kv heads removed
    assert units == [0, 3, 4, 6, 8, 9, 10, 12]  # kept 12, 9, 8, 6, 4, 3, 2, 0 heads+kv heads
    assert levels[-1][1] == [(3, 0)] and (0, 2) in levels[4][1] or (0, 2) in dict(levels)[6 * SMOL.per_q_head]


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_holds_after_every_mutation(ratio):
    """Every candidate stays on the lattice, and its fixed-up widths remove the budget to within
    half a channel (what any width can do), after each of 3,000 random switches."""
    spaces = [SMOL] * 30
    p = make_problem(spaces, ratio * SMOL_DENSE, 64)
    shapes = [[o[0] for _, o in attention_shapes(s)] for s in spaces]
    channels = [[*range(1536, 0, -64), 0]] * 30
    rng = random.Random(1)
    levels = [0] * 60
    for u in itertools.cycle(range(1, 60, 2)):  # a start on the lattice: FFN levels up, round robin
        if p.total(levels) >= p.budget - p.tol:
            break
        levels[u] += 1
    assert p.feasible(levels)
    seen_attn = set()
    for _ in range(3000):
        new = mutate(p, levels, rng)
        assert new is not None and new != levels
        levels = new
        assert p.feasible(levels)
        alloc = widths_for(p, spaces, levels, shapes, channels)
        got = removed_params(spaces, alloc.widths)
        assert abs(got - p.budget) <= SMOL.per_channel / 2, (got, p.budget)
        seen_attn.add(tuple(levels[0::2]))
    assert len(seen_attn) > 100  # attention moved too, not only FFN swaps


def test_equal_steps_switch_keeps_the_total_exactly():
    """With equal FFN steps only, a switch is EvoPress's: one up, one down, total unchanged."""
    p = Problem([[0, 10, 20, 30]] * 5, [True] * 5, budget=50, tol=5)
    rng = random.Random(0)
    levels = [2, 1, 1, 1, 0]
    for _ in range(500):
        levels = mutate(p, levels, rng)
        assert p.total(levels) == 50


def test_ffn_ladder_is_slimgpt_with_fixed_groups():
    """One greedy path gives every ladder level, equal to a fresh prune_channels(group=s) to that width,
    and ffn_variant_at reproduces ladder widths and continues between them."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 400, generator=g) * torch.rand(48, 1, generator=g)
    H = 2 * X @ X.T / 400
    W = torch.randn(16, 48, generator=g)
    counts = [48, 40, 32, 24, 16, 8, 0]
    Hinv, _ = damped_inverse(H, 0.01)
    path = ffn_path(W.clone(), Hinv, counts)
    for (kept, w, _), c in zip(path, counts[1:]):
        W2, Hinv2 = W.clone(), damped_inverse(H, 0.01)[0]
        res = prune_channels(W2, Hinv2, 48 - c, group_size=8)
        assert kept == res.kept
        torch.testing.assert_close(w, W2[:, res.kept], atol=1e-5, rtol=1e-5)
    v = ffn_variant_at(W, H, 32, 8, 0.01)
    assert v.kept == path[1][0]
    v = ffn_variant_at(W, H, 29, 8, 0.01)
    assert len(v.kept) == 29 and set(v.kept) <= set(path[1][0])


def test_search_finds_the_enumerated_optimum():
    """A non-additive fitness on a lattice small enough to enumerate: the search reaches its minimum."""
    p = Problem([[0, 30, 60], [0, 10, 20, 30, 40], [0, 45, 60], [0, 10, 20, 30, 40], [0, 10, 20, 30, 40], [0, 30, 60]],
                [False, True, False, True, True, False], budget=100, tol=5)
    w = [3.0, 1.0, 2.5, 1.2, 0.8, 2.0]

    def f(levels: list[int], n: int) -> float:
        r = [p.removed[u][lv] / 10 for u, lv in enumerate(levels)]
        return sum(wi * ri ** 1.5 for wi, ri in zip(w, r)) + 0.7 * r[1] * r[3] + 0.4 * r[0] * r[5]

    feasible = [list(c) for c in itertools.product(*[range(len(r)) for r in p.removed]) if p.feasible(list(c))]
    best = min(feasible, key=lambda c: f(c, 1))
    start = max(feasible, key=lambda c: f(c, 1))
    res = evolve(p, f, start, EvoSettings(offspring=6, stages=(1, 1), survivors=(3,), generations=150), progress=False)
    assert res.levels == best and res.fitness == pytest.approx(f(best, 1))
    assert res.start_fitness > res.fitness


def _planted(seed: int = 0):
    model = build_tiny(LlamaConfig, LlamaForCausalLM, seed=seed, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()  # layer 2's MLP adds nothing: free to remove
    return model


def test_planted_free_block_is_found_by_the_search():
    """From the log schedule's start (which spreads the cut), KL search moves it all onto the free MLP."""
    model = _planted()
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    budget = spaces[2].channels * spaces[2].per_channel  # exactly one MLP block
    calib = calib_ids()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        db = build_database(ad, calib, spaces, DEV, Path(d) / "db", {}, ffn_step=16, progress=False)
        p = make_problem(spaces, budget, 16, attn_removed=db.attn_removed)
        start = [0] * 8
        for u in (1, 3, 7, 1, 3, 7, 1, 3, 7, 1, 3, 7):  # spread over the other MLPs
            if p.total(start) < p.budget - p.tol:
                start[u] += 1
        assert p.feasible(start) and start[5] == 0
        fit = KLFitness(ad, Stitcher(ad, db), calib[:4], DEV)
        assert fit(start, 128) > 1e-3  # 4 windows of 32 tokens
        res = evolve(p, fit, start, EvoSettings(offspring=8, stages=(64, 128), survivors=(3,), generations=40, seed=0),
                     set_parent=lambda lv: fit.set_parent(lv, 128), progress=False)
        fit.stitcher.restore()
    assert res.levels[5] == p.top(5)  # layer 2's MLP removed
    assert res.levels == [0, 0, 0, 0, 0, p.top(5), 0, 0] and res.fitness < 1e-6


def _cfg(tmp_path, name: str, calib_file: str, **kw) -> PruneConfig:
    return PruneConfig(**{"model": "tiny", "out": str(tmp_path / name), "schedule": "search", "ratio": 0.3,
                          "calib": calib_file, "nsamples": 8, "seqlen": 32, "batch_size": 4, "search_tokens": "32,64",
                          "search_survivors": "3", "search_offspring": 6, "search_generations": 6,
                          **kw})


@pytest.mark.parametrize("final", ["stitch", "rerun"])
def test_prune_with_search_hits_the_budget_and_finds_the_planted_block(final, tiny_tokenizer, calib_file, tmp_path):
    model = _planted()
    dense = parameter_count(model)
    spaces = layer_spaces(get_adapter(model))
    ratio = spaces[2].channels * spaces[2].per_channel / dense
    res = prune(_cfg(tmp_path, final, calib_file, ratio=ratio, search_final=final), model=model,
                tokenizer=tiny_tokenizer, progress=False)
    s = res.report["method"]["search"]
    assert res.report["method"]["schedule"] == "search" and res.report["method"]["name"] == "slimgpt"
    assert abs(s["params"]["off_by"]) <= spaces[0].per_channel / 2
    assert dense - parameter_count(res.model) == s["params"]["removed"]
    assert s["allocation"][2]["channels"] == 0  # the free block
    assert set(s["time_s"]) >= {"database", "dense_logits", "search", "final"}
    meta = json.loads((tmp_path / final / "slimgpt.json").read_text())
    assert meta["layers"][2]["channels"] == "0/96" and meta["method"]["search"]["levels"] == s["levels"]
    assert not (tmp_path / f"{final}.search.db").exists() and not (tmp_path / f"{final}.search.json").exists()


def test_stitched_model_equals_the_forward_with_the_chosen_variants(tiny_llama_gqa):
    """Surgery on stitched variants gives the logits the search scored (sliced variants in place)."""
    ad = get_adapter(tiny_llama_gqa)
    spaces = layer_spaces(ad)
    calib = calib_ids()
    import tempfile
    from pathlib import Path

    from slimgpt.methods.searched import stitch

    with tempfile.TemporaryDirectory() as d:
        db = build_database(ad, calib, spaces, DEV, Path(d) / "db", {}, ffn_step=16, progress=False)
        levels = [2, 3, len(db.attn_removed[1]) - 1, 1, 4, len(db.ffn_levels[2]) - 1, 1, 0]
        stitcher = Stitcher(ad, db)
        fit = KLFitness(ad, stitcher, calib[:2], DEV)
        stitcher.install(levels)
        ids = calib_ids(2, 32, seed=9)
        with torch.no_grad():
            ref = torch.cat([ad.logits(fit._run(ad.embed(ids[k : k + 1]), 0, 32)) for k in range(2)])
        fit.set_parent([0] * 8, 64)  # the parent cache taken from an evaluation equals a fresh pass
        kl = fit(levels, 64)
        fit.set_parent(levels, 64)
        adopted = fit._cache
        fit.set_parent(levels, 64)
        assert fit._cache is not adopted and fit(levels, 64) == kl
        assert all(torch.equal(a, b) for w in adopted for a, b in zip(adopted[w], fit._cache[w], strict=True))
        stitcher.restore()
        model = copy.deepcopy(tiny_llama_gqa)
        widths = [LayerWidth(0, 0, db.ffn_levels[i][levels[2 * i + 1]], 0.0) for i in range(4)]
        plans = stitch(get_adapter(model), db, levels, None, widths, 0.01)
        slim = shrink_model(model, plans)
        with torch.no_grad():
            got = slim(ids).logits
            dense_again = tiny_llama_gqa(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - dense_again).abs().max() > 1e-3  # it is pruned
    assert slim.config.layer_intermediate_size[2] == 0 and slim.config.layer_num_attention_heads[1] == 0


def test_interrupted_search_resumes_to_the_same_result(tiny_llama_gqa, tiny_tokenizer, calib_file, tmp_path,
                                                       monkeypatch):
    from slimgpt.methods.blockpruner import SearchJournal

    whole = prune(_cfg(tmp_path, "whole", calib_file), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer,
                  progress=False)
    real, calls = KLFitness.__call__, []

    def dies(self, levels, n):
        calls.append(1)
        if len(calls) == 40:  # the last call of generation 4 (3 starts and the parent, then 6 + 3 per generation)
            raise KeyboardInterrupt
        return real(self, levels, n)

    monkeypatch.setattr(KLFitness, "__call__", dies)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prune(_cfg(tmp_path, "cut", calib_file), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer,
              progress=False)
    journal = SearchJournal.for_out(out)
    state = json.loads(journal.read_text())
    assert state["evo"]["generation"] == 3 and (tmp_path / "cut.search.db" / "index.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        prune(_cfg(tmp_path, "cut", calib_file), model=copy.deepcopy(tiny_llama_gqa), tokenizer=tiny_tokenizer,
              progress=False)
    monkeypatch.setattr(KLFitness, "__call__", real)
    res = prune(_cfg(tmp_path, "cut", calib_file, resume=True), model=copy.deepcopy(tiny_llama_gqa),
                tokenizer=tiny_tokenizer, progress=False)
    a, b = res.report["method"]["search"], whole.report["method"]["search"]
    assert a["levels"] == b["levels"] and a["history"] == b["history"] and a["kl"] == b["kl"]
    assert a["starts"] == b["starts"] and a["generations"] == b["generations"] == 6
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(res.model(ids).logits, whole.model(ids).logits)
    assert not journal.exists()


def test_search_is_seeded(tiny_llama, tiny_tokenizer, calib_file, tmp_path):
    runs = [prune(_cfg(tmp_path, f"s{k}", calib_file, search_final="stitch", seed=seed),
                  model=copy.deepcopy(tiny_llama), tokenizer=tiny_tokenizer, progress=False).report["method"]["search"]
            for k, seed in enumerate((0, 0))]
    assert runs[0]["levels"] == runs[1]["levels"] and runs[0]["history"] == runs[1]["history"]


@pytest.mark.parametrize("kw, match", [
    ({"method": "magnitude"}, "needs --method slimgpt"),
    ({"search_budget": "soon"}, "--search-budget"),
    ({"search_survivors": "4,2,1"}, "--search-survivors"),
    ({"search_final": "merge"}, "--search-final"),
    ({"search_offspring": 0}, "--search-offspring"),
])
def test_bad_search_settings_fail_early(kw, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**{"schedule": "search", **kw}).validate()


def test_cli_flags_reach_the_config():
    from slimgpt.cli import build_parser
    from slimgpt.cli.prune import config_from_args
    from slimgpt.search.options import parse_seconds

    a = build_parser().parse_args(["prune", "--schedule", "search", "--search-budget", "90s", "--search-tokens",
                                   "256,1024", "--search-survivors", "2", "--search-final", "stitch", "--out", "x"])
    cfg = config_from_args(a)
    assert (cfg.schedule, cfg.search_budget, cfg.search_tokens, cfg.search_final) == ("search", "90s", "256,1024", "stitch")
    assert parse_seconds("25m") == 1500 and parse_seconds("1.5h") == 5400 and parse_seconds(30) == 30
    cfg.validate()


def test_time_budget_stops_between_generations():
    """A spent budget returns the start (no pass); a budget stops after the generation it ends in."""
    p = Problem([[0, 10, 20, 30]] * 4, [True] * 4, budget=40, tol=5)
    calls = []

    def f(levels: list[int], n: int) -> float:
        calls.append(1)
        return float(levels[0])

    res = evolve(p, f, [1, 1, 1, 1], EvoSettings(offspring=4, stages=(1,), survivors=()), deadline=0.0,
                 start_fitness=1.0, progress=False)
    assert res.stopped_by == "budget" and res.generations == 0 and not calls
    import time

    def slow(levels: list[int], n: int) -> float:
        time.sleep(0.01)
        return float(levels[0])

    res = evolve(p, slow, [1, 1, 1, 1], EvoSettings(offspring=4, stages=(1,), survivors=(), generations=50),
                 deadline=time.perf_counter() + 0.1, progress=False)
    assert res.stopped_by == "budget" and 0 < res.generations < 50
