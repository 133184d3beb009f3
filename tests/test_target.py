"""``--target vllm|sglang``: every allocation is chosen inside the shapes the engine serves, on budget.

The shape rules themselves live in :mod:`slimgpt.serving`; these tests check each allocation kind
against them (``Constraint.violation`` / ``route_for``, an independent statement of the rules), the
parameter budget against the rounding unit, and that ``--target any`` is today's arithmetic.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt.allocation import candidates
from slimgpt.api import prune
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces
from slimgpt.errors import ConfigError
from slimgpt.pipeline import served_route
from slimgpt.schedule import (
    LayerSpace,
    LayerWidth,
    removed_params,
    round_layer,
    solve_widths,
    target_constraint,
)
from slimgpt.search.levels import (
    Problem,
    ffn_channels,
    ladders,
    make_problem,
    mutate,
    nearest_levels,
    repair,
    widths_for,
)
from slimgpt.serving import ROUTES, SGLANG_FFN_UNIT, route_for
from slimgpt.surgery import layer_shapes, parameter_count

# SmolLM2-135M's and Qwen2.5-0.5B's layers (9/3 heads of 64, FFN 1536; 14/2 heads with q/k/v biases, FFN 4864)
SMOL = LayerSpace(9, 3, 1536, 2 * 64 * 576, 2 * 64 * 576, 3 * 576)
QWEN = LayerSpace(14, 2, 4864, 2 * 64 * 896 + 64, 2 * 64 * 896 + 128, 3 * 896)
MODELS = {"smol": ([SMOL] * 30, 134_515_008), "qwen": ([QWEN] * 24, 494_032_768)}


from test_search import one_thread  # noqa: E402,F401  (an autouse fixture: tiny matrices run on one thread)


def _shapes(spaces: list[LayerSpace], widths: list[LayerWidth]) -> list[tuple[int, int, int]]:
    return [(w.heads(s), w.kv_heads(s), w.channels) for s, w in zip(spaces, widths)]


def _unit_params(target: str, s: LayerSpace) -> int:
    """One rounding unit of the budget: a channel, or 256 of them for SGLang."""
    c = target_constraint(target)
    return (c.ffn_unit if c else 1) * s.per_channel


def _served(target: str, spaces: list[LayerSpace], widths: list[LayerWidth]) -> None:
    """Inside the route the allocation was chosen for (vLLM: the transformers route, every
    attention kept; SGLang: deci, one head count, FFN widths in multiples of 256)."""
    c = target_constraint(target)
    assert c is not None and c.violation(_shapes(spaces, widths)) is None
    assert route_for(target, _shapes(spaces, widths)) == c


# ---------------------------------------------------------------------------------- --target any
def test_any_gives_todays_widths():
    """Digests of today's solved widths, auto candidates and search ladders, taken before
    ``--target`` existed: ``any`` (no constraint) must reproduce them bit for bit."""
    out = {}
    for name, (sp, tot) in MODELS.items():
        for ratio in (0.2, 0.5, 0.7):
            for sched in ("log", "uniform", "linear", "log-decrease"):
                w = solve_widths(sp, tot, ratio, sched, constraint=target_constraint("any"))
                out[f"{name}-{sched}-{ratio}"] = [(x.remove_groups, x.remove_per_group, x.channels) for x in w]
            fam = candidates(sp, tot, ratio, constraint=None)
            out[f"{name}-auto-{ratio}"] = {k: [(x.remove_groups, x.remove_per_group, x.channels) for x in v]
                                           for k, v in fam.items()}
    digest = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    assert digest == "96c7eb6a51501a8cef4fbfb554b4094d0f7c745150cccd58690ea11df4506753"
    lad = [ladders(s, lv, st) for s in (SMOL, QWEN, LayerSpace(8, 4, 96, 128, 128, 192))
           for lv, st in ((10, None), (4, None), (None, 64))]
    assert hashlib.sha256(json.dumps(lad).encode()).hexdigest() == \
        "52c8bccd4ca191eab5de66463a842459b0d6288f25f0681783e863d240d67ff8"


# ---------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("model", ["smol", "qwen"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_schedules_stay_inside_and_on_budget(target, model, ratio):
    sp, tot = MODELS[model]
    c = target_constraint(target)
    for sched in ("log", "uniform", "linear", "log-decrease"):
        w = solve_widths(sp, tot, ratio, sched, constraint=c)
        _served(target, sp, w)
        assert abs(removed_params(sp, w) - ratio * tot) <= _unit_params(target, sp[0]) / 2, sched
    fam = candidates(sp, tot, ratio, constraint=c)  # --schedule auto's family
    assert "log" in fam and len(fam) >= 2
    for name, w in fam.items():
        _served(target, sp, w)
        assert abs(removed_params(sp, w) - ratio * tot) <= _unit_params(target, sp[0]) / 2, name
    if target == "sglang":  # heads never pruned by a schedule
        assert all(w.remove_groups == w.remove_per_group == 0 for ws in fam.values() for w in ws)


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_ratio_file_is_honoured_inside_the_shapes(target, tmp_path):
    """A file's ratios (deep layers emptied) under a target: servable, and the total lands within
    half a unit of what the file removes without one."""
    sp, tot = MODELS["smol"]
    ratios = [0.05 * (i % 4) for i in range(26)] + [0.9, 0.95, 1.0, 1.0]
    f = tmp_path / "ratios.json"
    f.write_text(json.dumps(ratios))
    free = solve_widths(sp, tot, 0.2, str(f))
    assert any(w.heads(s) == 0 for s, w in zip(sp, free))  # the file empties attentions
    w = solve_widths(sp, tot, 0.2, str(f), constraint=target_constraint(target))
    _served(target, sp, w)
    assert abs(removed_params(sp, w) - removed_params(sp, free)) <= _unit_params(target, sp[0]) / 2
    # per layer the file's profile survives: the layers it prunes hardest stay the most pruned
    kept = [wi.params(s) / s.params for s, wi in zip(sp, w)]
    assert max(kept[-4:]) < min(kept[:26])


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 0.85, 0.95, 1.0])
def test_vllm_rounding_is_the_nearest_kept_attention(ratio):
    """Against a brute force over every GQA shape that keeps a head: the nearest kept attention,
    ties to fewer whole groups removed; FFN as without a target."""
    c = target_constraint("vllm")
    for s in (SMOL, QWEN, LayerSpace(8, 4, 96, 128, 128, 192)):
        attn = s.num_heads * s.per_q_head + s.num_kv_heads * s.per_kv_head
        best = min((abs(w.params(s) - (1 - ratio) * attn), g, r)
                    for g in range(s.num_kv_heads) for r in range(s.n_rep)
                    for w in [LayerWidth(g, r, 0, 0.0)])
        got = round_layer(s, ratio, constraint=c)
        assert (got.remove_groups, got.remove_per_group) == best[1:] and got.heads(s) > 0
        assert got.channels == round_layer(s, ratio).channels


def test_vllm_keeps_the_attention_that_the_free_schedule_removes():
    sp = [LayerSpace(8, 4, 96, 128, 128, 192)] * 4  # the tiny test model's layers
    tot = int(1.3 * sum(s.params for s in sp))
    free = solve_widths(sp, tot, 0.6, "linear")
    assert any(w.heads(s) == 0 for s, w in zip(sp, free))
    held = solve_widths(sp, tot, 0.6, "linear", constraint=target_constraint("vllm"))
    _served("vllm", sp, held)
    assert abs(removed_params(sp, held) - 0.6 * tot) <= sp[0].per_channel / 2
    free_family = candidates(sp, tot, 0.7)  # --schedule auto
    assert any(w.heads(s) == 0 for ws in free_family.values() for s, w in zip(sp, ws))
    for name, ws in candidates(sp, tot, 0.7, constraint=target_constraint("vllm")).items():
        _served("vllm", sp, ws)
        assert abs(removed_params(sp, ws) - 0.7 * tot) <= sp[0].per_channel / 2, name


def test_sglang_ffn_widths_are_whole_units_even_for_an_odd_model():
    """A model whose FFN is no multiple of 256 is pruned to multiples (the widest is the largest below)."""
    sp = [LayerSpace(8, 2, 1000, 1024, 1024, 768)] * 6
    tot = int(1.2 * sum(s.params for s in sp))
    w = solve_widths(sp, tot, 0.3, "log", constraint=target_constraint("sglang"))
    _served("sglang", sp, w)
    assert max(x.channels for x in w) <= 768
    assert abs(removed_params(sp, w) - 0.3 * tot) <= _unit_params("sglang", sp[0]) / 2
    with pytest.raises(ConfigError, match="at least .19.1%.; raise --ratio"):  # 232 channels x 6 layers must go
        solve_widths(sp, tot, 0.15, "log", constraint=target_constraint("sglang"))


def test_an_unreachable_target_is_refused_in_one_line():
    sp, tot = MODELS["smol"]  # SGLang keeps every attention in a schedule: the FFNs hold 59 % of SmolLM2
    with pytest.raises(ConfigError, match="cannot be reached inside the shapes the deci route serves"):
        solve_widths(sp, tot, 0.7, "log", constraint=target_constraint("sglang"))


# ---------------------------------------------------------------------------------- search ladders
@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_search_lattice_and_mutations_stay_servable(target, ratio):
    """Every ladder level, every mutated and repaired lattice point and its fixed-up widths:
    servable, on budget to half a unit."""
    c = target_constraint(target)
    sp, tot = [SMOL] * 30, MODELS["smol"][1]
    lad = [ladders(s, 10, None, c) for s in sp]
    shapes = [[o[0] for _, o in a] for a, _, _ in lad]
    ffn = [f for _, f, _ in lad]
    for s, (a, f, g) in zip(sp, lad):
        for _, options in a:
            w = LayerWidth(*options[0], 0, 0.0)
            assert c.violation([(w.heads(s), w.kv_heads(s), 0), (s.num_heads, s.num_kv_heads, 0)]) is None
        assert all(ch % c.ffn_unit == 0 for ch in f) and f[0] == s.channels and f[-1] == 0
        assert set(f) <= set(ffn_channels(s, g))  # the OBS path passes through every level
    if target == "vllm":
        assert all(LayerWidth(*a[-1][1][0], 0, 0).heads(SMOL) > 0 for a, _, _ in lad)  # no removed attention
    else:
        assert [r for r, _ in lad[0][0]] == [0, SMOL.num_heads * SMOL.per_q_head + 3 * SMOL.per_kv_head]
    p = make_problem(sp, ratio * tot, attn_removed=[[r for r, _ in a] for a, _, _ in lad], ffn_kept=ffn, constraint=c)
    assert p.keep_attention == (target == "sglang")
    rng = random.Random(1)
    ffn_total = sum(s.channels * s.per_channel for s in sp)
    want = [0 if u % 2 == 0 else ratio * tot * s.channels * s.per_channel / ffn_total for u, s in
            enumerate(x for x in sp for _ in range(2))]
    levels = repair(p, nearest_levels(p, want), rng)
    assert levels is not None
    for _ in range(300 if target == "sglang" else 60):
        nxt = mutate(p, levels, rng)
        levels = nxt if nxt is not None else levels
        alloc = widths_for(p, sp, levels, shapes, ffn, c.ffn_unit)
        _served(target, sp, alloc.widths)
        if alloc.fixup_layer is not None:
            assert abs(removed_params(sp, alloc.widths) - ratio * tot) <= _unit_params(target, SMOL) / 2


def test_search_never_removes_the_last_attention_on_the_deci_route():
    """One head count for the model needs a layer with heads: mutations and the error-greedy start
    keep one attention, where the free problem removes both."""
    from slimgpt.methods.searched import error_start

    attn = 1000
    removed = [[0, attn], [0, 400, 800, 1200], [0, attn], [0, 400, 800, 1200]]  # attention: dense or removed
    seen = {}
    for keep in (False, True):
        p = Problem(removed, [False, True, False, True], 2400.0, 200.0, keep)
        rng, levels, both = random.Random(0), [1, 2, 0, 1], 0
        for _ in range(400):
            levels = mutate(p, levels, rng) or levels
            both += levels[0] == levels[2] == 1
        seen[keep] = both

        class Db:  # removing an attention is the cheapest step by far
            input_norms = [[1.0, 1.0]] * 2
            errors = {"attn": [[0.0, 0.0]] * 2, "ffn": [[0.0, 5.0, 10.0, 15.0]] * 2}

        start = error_start(p, Db())
        assert (start[0] + start[2] < 2) == keep
    assert seen[False] > 0 and seen[True] == 0


def test_the_first_kept_block_is_an_attention_on_the_deci_route():
    """vLLM's DeciLM starts the residual stream at an attention: a removed first attention needs
    its MLP gone too, in the search (every lattice point) and in the block search (never scored)."""
    from slimgpt.methods.blockpruner import removable

    p = make_problem([SMOL] * 2, 1.0e6, 256, constraint=target_constraint("sglang"))
    assert p.keep_attention and p.leading_attention
    tops = [p.top(u) for u in range(4)]
    assert not p.valid([tops[0], 0, 0, 0]) and p.valid([tops[0], tops[1], 0, 0]) and p.valid([0, 0, tops[2], 0])
    assert not p.valid([tops[0], tops[1], tops[2], 0]) and not p.valid([tops[0], 0, tops[2], tops[3]])
    deci = ROUTES["vllm"][1]
    assert not removable(0, [0, 1, 2, 3], deci) and removable(0, [0, 2, 3], deci) and removable(2, [0, 1, 2, 3], deci)
    assert not removable(2, [2, 3], deci) and removable(1, [0, 1, 2], deci)  # the last attention stays
    assert removable(0, [0, 1, 2, 3], None) and not removable(2, [0, 1, 2, 3], ROUTES["vllm"][0])


def test_search_database_and_stitch_under_vllm_keep_every_attention():
    """vLLM's top attention level is a stored variant: the stitcher installs it (not a skipped
    block), and the stitched, cut model computes what the search scored."""
    from slimgpt.methods.searched import stitch
    from slimgpt.search.database import build_database
    from slimgpt.search.fitness import KLFitness, Stitcher
    from slimgpt.surgery import shrink_model

    model = build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2, tie_word_embeddings=False)
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    c = target_constraint("vllm")
    with tempfile.TemporaryDirectory() as d:
        db = build_database(ad, calib, spaces, torch.device("cpu"), Path(d) / "db", {}, levels=4, progress=False,
                            constraint=c)
        tops = [len(a) - 1 for a in db.attn_removed]
        assert all(db.variant("attn", i, t) is not None for i, t in enumerate(tops))  # stored, not removed
        levels = [tops[0], 1, 0, len(db.ffn_levels[1]) - 1, tops[2], 2, 1, 0]
        stitcher = Stitcher(ad, db)
        fit = KLFitness(ad, stitcher, calib[:2], torch.device("cpu"))
        stitcher.install(levels)
        assert not any(stitcher.removed(u) for u in range(0, 8, 2))
        ids = calib[:2, :16]
        with torch.no_grad():
            ref = torch.cat([ad.logits(fit._run(ad.embed(ids[k : k + 1]), 0, 16)) for k in range(2)])
        stitcher.restore()
        slim_model = copy.deepcopy(model)
        widths = [LayerWidth(0, 0, db.ffn_levels[i][levels[2 * i + 1]], 0.0) for i in range(4)]
        slim = shrink_model(slim_model, stitch(get_adapter(slim_model), db, levels, None, widths, 0.01))
        with torch.no_grad():
            got = slim(ids).logits
    torch.testing.assert_close(got.reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)
    shapes = layer_shapes(slim)
    assert all(s["heads"] > 0 for s in shapes) and shapes[0]["heads"] < 8 and shapes[1]["channels"] == 0
    assert served_route("vllm", shapes) == "transformers"


# ---------------------------------------------------------------------------------- whole runs
def _tiny(**kw):
    return build_tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=kw.pop("kv", 4), tie_word_embeddings=True,
                      **kw)


def _run(tmp_path, name, model, tok, calib, **kw):
    cfg = PruneConfig(**{"model": "tiny", "out": str(tmp_path / name), "calib": calib, "nsamples": 8,
                         "seqlen": 32, "batch_size": 4, "device": "cpu", **kw})
    dense = parameter_count(model)
    res = prune(cfg, model=model, tokenizer=tok, progress=False)
    meta = json.loads((tmp_path / name / "slimgpt.json").read_text())
    return res, dense, meta


def test_prune_under_vllm_keeps_the_attention_any_removes(tiny_tokenizer, calib_file, tmp_path):
    """High ratio on a tiny model: the free log schedule empties an attention, --target vllm does
    not, and the run records the route it is served by."""
    free, _, _ = _run(tmp_path, "any", _tiny(), tiny_tokenizer, calib_file, ratio=0.6, schedule="linear")
    assert any(s["heads"] == 0 for s in layer_shapes(free.model))
    res, dense, meta = _run(tmp_path, "vllm", _tiny(), tiny_tokenizer, calib_file, ratio=0.6, schedule="linear",
                            target="vllm")
    shapes = layer_shapes(res.model)
    assert all(s["heads"] > 0 for s in shapes)
    assert meta["config"]["target"] == "vllm" and meta["serving"] == {"target": "vllm", "route": "transformers"}
    spaces = layer_spaces(get_adapter(_tiny()))
    assert abs(dense - parameter_count(res.model) - 0.6 * dense) <= spaces[0].per_channel / 2
    assert "serving" not in free.report  # --target any: today's report


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_auto_prune_inside_the_target(target, tiny_tokenizer, calib_file, tmp_path):
    model = _tiny(intermediate_size=512)
    res, dense, meta = _run(tmp_path, "auto", model, tiny_tokenizer, calib_file, ratio=0.3, schedule="auto",
                            target=target)
    spaces = layer_spaces(get_adapter(_tiny(intermediate_size=512)))
    route = served_route(target, layer_shapes(res.model))
    assert route == ROUTES[target][0].route == meta["serving"]["route"]
    assert abs(dense - parameter_count(res.model) - 0.3 * dense) <= _unit_params(target, spaces[0]) / 2


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_search_prune_inside_the_target(target, tiny_tokenizer, calib_file, tmp_path):
    """Layer 1's attention adds nothing (a planted free block): the search removes it where the
    route allows (SGLang) and keeps some of it for vLLM."""
    model = _tiny(intermediate_size=512, kv=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    res, dense, meta = _run(tmp_path, "s", model, tiny_tokenizer, calib_file, ratio=0.3, schedule="search",
                            target=target, search_tokens="32,64", search_survivors="3", search_offspring=4,
                            search_generations=4, search_levels=4)
    shapes = layer_shapes(res.model)
    assert route_for(target, [(s["heads"], s["kv_heads"], s["channels"]) for s in shapes]) == ROUTES[target][0]
    assert (shapes[1]["heads"] == 0) == (target == "sglang")
    s = meta["method"]["search"]
    spaces = layer_spaces(get_adapter(_tiny(intermediate_size=512, kv=2)))
    assert dense - parameter_count(res.model) == s["params"]["removed"]
    assert abs(s["params"]["off_by"]) <= _unit_params(target, spaces[0]) / 2


def test_blockpruner_is_served_by_vllm_deci_and_refused_by_sglang_for_odd_ffns(tiny_tokenizer, calib_file,
                                                                                tmp_path):
    res, _, meta = _run(tmp_path, "bp", _tiny(), tiny_tokenizer, calib_file, ratio=0.3, method="blockpruner",
                        target="vllm")
    assert any(s["heads"] == 0 or s["channels"] == 0 for s in layer_shapes(res.model))
    assert meta["serving"]["route"] in ("transformers", "deci")
    with pytest.raises(ConfigError, match="multiples of 256.*model's 96"):  # before the search
        _run(tmp_path, "bp2", _tiny(), tiny_tokenizer, calib_file, ratio=0.3, method="blockpruner", target="sglang")
    res, _, meta = _run(tmp_path, "bp3", _tiny(intermediate_size=512), tiny_tokenizer, calib_file, ratio=0.3,
                        method="blockpruner", target="sglang")
    assert meta["serving"] == {"target": "sglang", "route": "deci"}


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_hybrid_prunes_for_the_deci_route(target, tiny_tokenizer, calib_file, tmp_path):
    """Block removal and width pruning together: no head is pruned (blocks go whole), so one head
    count serves it; the width part lands the budget to the unit."""
    model = _tiny(intermediate_size=512, kv=2)
    res, dense, meta = _run(tmp_path, "h", model, tiny_tokenizer, calib_file, ratio=0.3,
                            method="slimgpt+blockpruner", depth_share=0.5, target=target)
    shapes = layer_shapes(res.model)
    assert {s["heads"] for s in shapes} <= {0, 8}
    assert meta["serving"]["route"] == ("deci" if any(s["heads"] == 0 for s in shapes) else ROUTES[target][0].route)
    assert meta["method"]["depth_params_removed"] > 0
    assert any(s["channels"] not in (0, 512) for s in shapes)  # the width part ran
    spaces = layer_spaces(get_adapter(_tiny(intermediate_size=512, kv=2)))
    assert abs(dense - parameter_count(res.model) - 0.3 * dense) <= _unit_params(target, spaces[0]) / 2


def test_peer_methods_under_a_target(tiny_tokenizer, calib_file, tmp_path):
    res, dense, meta = _run(tmp_path, "w", _tiny(intermediate_size=512), tiny_tokenizer, calib_file, ratio=0.4,
                            method="wanda-sp", schedule="log", target="sglang")
    assert meta["serving"]["route"] == "deci"
    assert all(s["channels"] % SGLANG_FFN_UNIT == 0 and s["heads"] == 8 for s in layer_shapes(res.model))
    res, dense, meta = _run(tmp_path, "l", _tiny(), tiny_tokenizer, calib_file, ratio=0.2, method="llm-pruner",
                            target="vllm")
    assert meta["serving"]["route"] == "transformers"


# ---------------------------------------------------------------------------------- options, final check
def test_bad_targets_are_refused_before_loading():
    with pytest.raises(ConfigError, match="--target must be one of"):
        PruneConfig(target="tensorrt").validate()
    with pytest.raises(ConfigError, match="--method flap"):
        PruneConfig(method="flap", target="vllm").validate()
    PruneConfig(method="shortgpt", target="vllm").validate()
    with pytest.raises(ConfigError, match="--schedule search keeps some FFNs at the model's 1000"):
        PruneConfig(schedule="search", target="sglang").check_model([1000], "llama")
    PruneConfig(schedule="log", target="sglang").check_model([1000], "llama")  # the schedule prunes it to 768
    with pytest.raises(ConfigError, match="--target sglang cannot serve this model .deci route: Gemma 3"):
        PruneConfig(target="sglang").check_model([1024], "gemma3")
    PruneConfig(target="vllm").check_model([1000], "gemma3")  # the transformers route takes it
    PruneConfig(target="vllm", method="blockpruner").check_model([1000], "gemma3")  # MLP blocks only
    with pytest.raises(ConfigError, match="shortgpt removes whole layers"):
        PruneConfig(target="vllm", method="shortgpt").check_model([1000], "llama", sliding=True)


def test_cli_has_the_option():
    import argparse

    from slimgpt.cli.prune import add_args, config_from_args

    p = argparse.ArgumentParser()
    add_args(p)
    assert config_from_args(p.parse_args(["--out", "x", "--target", "sglang"])).target == "sglang"
    assert config_from_args(p.parse_args(["--out", "x"])).target == "any"
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--target", "trt"])


def test_final_check_is_a_bug_not_a_user_error():
    ok = [{"heads": 8, "kv_heads": 4, "channels": 512}] * 2
    assert served_route("any", ok) is None and served_route("sglang", ok) == "deci"
    assert served_route("vllm", [*ok, {"heads": 0, "kv_heads": 0, "channels": 0}]) == "deci"
    bad = [{"heads": 8, "kv_heads": 4, "channels": 512}, {"heads": 4, "kv_heads": 2, "channels": 0},
           {"heads": 0, "kv_heads": 0, "channels": 512}]
    with pytest.raises(AssertionError, match="layer 2"):
        served_route("vllm", bad)
    with pytest.raises(AssertionError, match="layer 1"):
        served_route("sglang", bad)



def test_block_search_removes_only_what_the_route_serves(tiny_llama):
    """Transformers route: MLP blocks only. Deci route: any block, but one attention stays (the
    search is asked for all blocks but one, and the free search leaves an MLP)."""
    from slimgpt.methods.blockpruner import block_search

    ad = get_adapter(tiny_llama)
    spaces = layer_spaces(ad)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    dev = torch.device("cpu")
    mlps = block_search(ad, calib, spaces, dev, target_params=0.6 * sum(s.channels * s.per_channel for s in spaces),
                        progress=False, constraint=ROUTES["vllm"][0])
    assert mlps.removed and all(b % 2 == 1 for b in mlps.removed)
    assert all(name.endswith(".mlp") for st in mlps.steps for name in st["candidates"])
    free = block_search(ad, calib, spaces, dev, n_blocks=7, progress=False)
    deci = block_search(ad, calib, spaces, dev, n_blocks=7, progress=False, constraint=ROUTES["sglang"][0])
    assert [b for b in range(8) if b not in free.removed][0] % 2 == 1
    assert [b for b in range(8) if b not in deci.removed][0] % 2 == 0
    with pytest.raises(ConfigError, match="keeps every attention"):
        block_search(ad, calib, spaces, dev, n_blocks=5, progress=False, constraint=ROUTES["vllm"][0])


def test_gemma3_has_no_deci_route(tiny_tokenizer, calib_file, tmp_path):
    """Gemma 3 has no DeciLM mapping: SGLang is refused before any work, and vLLM's hybrid prunes
    for the Transformers backend (MLP blocks only, heads pruned)."""
    from test_gemma3 import tiny_gemma3

    with pytest.raises(ConfigError, match="--target sglang cannot serve this model"):
        _run(tmp_path, "g0", tiny_gemma3(), tiny_tokenizer, calib_file, ratio=0.3, target="sglang")
    res, dense, meta = _run(tmp_path, "g", tiny_gemma3(), tiny_tokenizer, calib_file, ratio=0.4,
                            method="slimgpt+blockpruner", depth_share=0.5, target="vllm")
    shapes = layer_shapes(res.model)
    assert all(s["heads"] > 0 for s in shapes) and meta["serving"]["route"] == "transformers"
    assert meta["method"]["depth_params_removed"] > 0
    assert all(name.endswith(".mlp") for name in meta["method"]["search"]["removed"])
    spaces = layer_spaces(get_adapter(tiny_gemma3()))
    assert abs(dense - parameter_count(res.model) - 0.4 * dense) <= spaces[0].per_channel / 2


def test_a_widths_file_is_checked_not_chosen(tiny_tokenizer, calib_file, tmp_path):
    """Per-layer widths a user gives are pruned as given: refused in one line when the target
    cannot serve them (pruned heads beside a removed attention), pruned when it can."""
    dense = {"remove_groups": 0, "remove_per_group": 0, "channels": 96}
    bad = [{"remove_groups": 0, "remove_per_group": 1, "channels": 64}, {**dense, "remove_groups": 4}, dense, dense]
    f = tmp_path / "widths.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="transformers route: layer 1: its attention block is removed; deci route: "
                                          "layer 2: 8 query heads where layer 0 has 4"):
        _run(tmp_path, "w0", _tiny(), tiny_tokenizer, calib_file, schedule=str(f), target="vllm")
    f.write_text(json.dumps([bad[0], dense, dense, dense]))
    res, _, meta = _run(tmp_path, "w1", _tiny(), tiny_tokenizer, calib_file, schedule=str(f), target="vllm")
    assert meta["serving"]["route"] == "transformers" and layer_shapes(res.model)[0]["heads"] == 4
