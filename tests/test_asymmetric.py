"""--compensate asymmetric|drift (issue #34): the kept weights are solved toward the dense model's
outputs, ``min ‖W′X̃ − T‖²`` with ``T = W X`` (``drift``: ``+ h − h̃``), X the dense model's inputs to
the linear and X̃ the pruned model's.

Checked against independent references: on random matrices, OBS removal from ``W* = W + G H⁻¹``
equals a float64 least-squares refit of the kept columns toward T (ridge ``δ‖W′ − W‖²``, the damping)
and its objective is never above the symmetric solution's on the same kept set; X = X̃ gives the
symmetric result bitwise; in a model layer the runner's statistics equal sums over every token and
the pruned o_proj/down_proj equal the refit on the collected activations; nothing removed leaves
the model unchanged; in memory, streamed, offloaded, resumed and on two torchrun ranks the same
weights come out.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from slimgpt.arch import get_adapter
from slimgpt.cli import main
from slimgpt.config import PruneConfig
from slimgpt.driver import activation_copies, layer_spaces, run_layerwise
from slimgpt.errors import ConfigError, ModelError
from slimgpt.methods.slimgpt import SlimGPT
from slimgpt.runner import LayerRunner, Timer
from slimgpt.schedule import LayerWidth, solve_widths
from slimgpt.solvers.channels import prune_channels
from slimgpt.solvers.heads import prune_heads
from slimgpt.solvers.hessian import CrossAccumulator, HessianAccumulator, damped_inverse
from slimgpt.solvers.obs import compensation_target, heldout_shrinkage, remove_columns
from slimgpt.surgery import parameter_count, shrink_model

DEV = torch.device("cpu")


# ---------------------------------------------------------------------------------- the maths
def problem(seed: int, rows: int = 6, cols: int = 16, n: int = 300, drift: float = 0.3,
            dtype: torch.dtype = torch.float64) -> dict:
    """Random W, pruned inputs X̃, dense inputs X = X̃ + drift·noise, correlated columns."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / math.sqrt(cols) + torch.eye(cols, dtype=dtype)
    Xt = torch.randn(n, cols, generator=g, dtype=dtype) @ mix
    X = Xt + drift * torch.randn(n, cols, generator=g, dtype=dtype) @ mix
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return {"W": W, "X": X, "Xt": Xt, "T": X @ W.T}


def statistics(p: dict, damp: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(H, G, Hinv, δ) through the accumulators, as the runner forms them (two batches)."""
    W, Xt = p["W"], p["Xt"]
    acc = HessianAccumulator(Xt.shape[1], dtype=dtype, sum_dtype=torch.float64)
    cross = CrossAccumulator(W.shape[0], Xt.shape[1], dtype=dtype)
    for part in (slice(0, 100), slice(100, None)):
        acc.add(Xt[part])
        cross.add((p["T"][part] - Xt[part] @ W.T), Xt[part])
    H, G = acc.finalize(), cross.finalize()
    Hinv, lam = damped_inverse(H, damp, dtype=dtype)
    return H, G, Hinv, lam * torch.diagonal(H).mean().item()


def refit(p: dict, kept: list[int], delta: float) -> torch.Tensor:
    """The independent reference: float64 least squares over the kept columns of
    ``2‖W′X̃ − T‖²/n + δ‖W′ − W‖²`` (removed columns zero), by an augmented ``lstsq``."""
    W, Xt, T = p["W"].double(), p["Xt"].double(), p["T"].double()
    n, k = Xt.shape[0], len(kept)
    A = torch.cat([Xt[:, kept] * math.sqrt(2 / n), math.sqrt(delta) * torch.eye(k, dtype=torch.float64)])
    B = torch.cat([T * math.sqrt(2 / n), math.sqrt(delta) * W[:, kept].T])
    out = torch.zeros_like(W)
    out[:, kept] = torch.linalg.lstsq(A, B).solution.T
    return out


def objective(p: dict, Wp: torch.Tensor, delta: float) -> tuple[float, float]:
    """(``‖W′X̃ − T‖²``, the damped objective ``2‖W′X̃ − T‖²/n + δ‖W′ − W‖²``) in float64."""
    Xt, T, W = p["Xt"].double(), p["T"].double(), p["W"].double()
    raw = (Xt @ Wp.double().T - T).pow(2).sum().item()
    return raw, 2 * raw / Xt.shape[0] + delta * (Wp.double() - W).pow(2).sum().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_from_the_target_equals_the_least_squares_refit(seed: int, dtype: torch.dtype, tol: float) -> None:
    p = problem(seed)
    _, G, Hinv, delta = statistics(p, 0.01, dtype)
    g = torch.Generator().manual_seed(100 + seed)
    removed = torch.randperm(16, generator=g)[:6].sort().values
    kept = [c for c in range(16) if c not in removed.tolist()]
    Wp = compensation_target(p["W"].to(dtype), G, Hinv)
    remove_columns(Wp, Hinv, removed)
    ref = refit(p, kept, delta)
    assert torch.all(Wp[:, removed] == 0)
    assert ((Wp.double() - ref).norm() / ref.norm()).item() < tol
    assert objective(p, Wp, delta)[1] == pytest.approx(objective(p, ref, delta)[1], rel=tol)


@pytest.mark.parametrize("seed", range(6))
def test_objective_never_above_symmetric_on_the_same_kept_set(seed: int) -> None:
    p = problem(seed, drift=0.1 * (seed + 1))
    for damp in (0.01, 1e-8):  # damped objective (what is minimised), and near-raw least squares
        _, G, Hinv, delta = statistics(p, damp, torch.float64)
        g = torch.Generator().manual_seed(seed)
        removed = torch.randperm(16, generator=g)[:8]
        asym = compensation_target(p["W"], G, Hinv)
        remove_columns(asym, Hinv.clone(), removed)
        sym = p["W"].clone()
        remove_columns(sym, Hinv.clone(), removed)
        a, s = objective(p, asym, delta), objective(p, sym, delta)
        assert a[1] <= s[1] * (1 + 1e-12)
        if damp < 1e-6:
            assert a[0] < s[0]  # the raw least squares too, once the damping is negligible


def test_greedy_solvers_reach_the_refit_for_the_sets_they_keep() -> None:
    """prune_channels (Dynamic Group Size) and prune_heads (GQA), started from W*, end at the
    least-squares refit of whatever they kept."""
    p = problem(3, rows=8, cols=24, n=400)
    _, G, Hinv, delta = statistics(p, 0.01, torch.float64)
    W = compensation_target(p["W"], G, Hinv)
    res = prune_channels(W, Hinv.clone(), 10, "dynamic", min_group=2)
    assert ((W - refit(p, res.kept, delta)).norm() / W.norm()).item() < 1e-9
    W = compensation_target(p["W"], G, Hinv)
    heads = prune_heads(W, Hinv.clone(), num_heads=6, num_kv_heads=3, head_dim=4, remove_groups=1, remove_per_group=1)
    kept = [h * 4 + d for h in heads.kept_heads for d in range(4)]
    assert len(heads.kept_heads) == 2
    assert ((W - refit(p, kept, delta)).norm() / W.norm()).item() < 1e-9


def test_equal_inputs_give_the_symmetric_solution_bitwise() -> None:
    p = problem(4, cols=24, dtype=torch.float32)
    p["X"], p["T"] = p["Xt"], p["Xt"] @ p["W"].T
    H, G, Hinv, _ = statistics(p, 0.01, torch.float32)
    assert not G.any()  # per-token differences: exactly zero, not a cancelled sum
    W = compensation_target(p["W"], G, Hinv)
    assert torch.equal(W, p["W"])
    a, b = W.clone(), p["W"].clone()
    ra = prune_channels(a, Hinv.clone(), 9)
    rb = prune_channels(b, Hinv.clone(), 9)
    assert ra.kept == rb.kept and torch.equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_heldout_shrinkage_minimises_the_heldout_objective(seed: int) -> None:
    """α from the closed form equals a brute-force grid minimum of ``‖(W + αC)X̃_h − T_h‖²`` on the
    held-out rows (computed from the data, not from H and G), so it is never worse there than
    symmetric (α = 0) or the full refit (α = 1)."""
    p = problem(seed, n=400, drift=0.3 + 0.2 * seed)
    p["Xt"], p["X"] = p["X"], p["Xt"]  # X̃ = X + noise: part of the correction generalises, part is noise
    p["T"] = p["X"] @ p["W"].T
    fit, held = slice(0, 60), slice(60, None)  # few fit tokens: the refit overfits and 0 < α < 1
    part = lambda sl: {"W": p["W"], "Xt": p["Xt"][sl], "T": p["T"][sl]}  # noqa: E731
    _, G_fit, Hinv_fit, _ = statistics(part(fit), 0.01, torch.float64)
    H_held, G_held, _, _ = statistics(part(held), 0.01, torch.float64)
    alpha = heldout_shrinkage(G_fit, Hinv_fit, G_held, H_held)
    C = G_fit @ Hinv_fit
    err = lambda a: (p["Xt"][held] @ (p["W"] + a * C).T - p["T"][held]).pow(2).sum().item()  # noqa: E731
    grid = torch.linspace(0, 1, 2001).tolist()
    best = min(grid, key=err)
    assert 0.2 < alpha < 0.9 and abs(alpha - best) <= 1e-3 and err(alpha) <= min(err(0.0), err(1.0)) * (1 + 1e-12)
    assert heldout_shrinkage(torch.zeros_like(G_fit), Hinv_fit, G_held, H_held) == 1.0  # nothing to shrink


def test_dead_columns_keep_their_weights() -> None:
    p = problem(5, dtype=torch.float32)
    p["Xt"][:, 3] = 0  # an input that is always zero on the pruned stream
    H, G, Hinv, _ = statistics(p, 0.01, torch.float32)
    assert not G[:, 3].any()
    dead = torch.diagonal(H) == 0
    W = compensation_target(p["W"], G, Hinv, dead)
    assert torch.equal(W[:, 3], p["W"][:, 3]) and not torch.equal(W, p["W"])


# ---------------------------------------------------------------------------------- in a model layer
def calib_ids(n: int = 16, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=g)


def streams(model, n: int = 16) -> tuple:
    """A layer's (adapter, layer, ctx, pruned-stream inputs, dense-stream inputs): the dense inputs
    are the embeddings, the pruned ones the same with noise (what earlier pruned layers leave)."""
    ad = get_adapter(model)
    ids = calib_ids(n)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dense = [ad.embed(b) for b in ids.split(4)]
    pruned = [d + 0.05 * torch.randn(d.shape, generator=g) for d in dense]
    return ad, ad.layers[1], ad.context(ids.shape[1], DEV, torch.float32), pruned, dense


def collect(module: torch.nn.Module, fn) -> torch.Tensor:
    """Every token's input to ``module`` while ``fn`` runs, as one float64 matrix."""
    seen: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            fn()
    finally:
        h.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("drift", [False, True])
def test_runner_statistics_and_dense_stream_equal_whole_token_sums(tiny_qwen2, drift: bool) -> None:
    ad, layer, ctx, pruned, dense = streams(tiny_qwen2)
    frozen = copy.deepcopy(layer)
    o, down = ad.attention(frozen).o, ad.mlp(frozen).down
    X = collect(o, lambda: [ad.attention_block(frozen, d, ctx) for d in dense])
    Xt = collect(o, lambda: [ad.attention_block(frozen, x, ctx) for x in pruned])
    with torch.no_grad():
        mids = [ad.attention_block(frozen, d, ctx) for d in dense]
        mids_t = [ad.attention_block(frozen, x, ctx) for x in pruned]
        outs = [ad.mlp_block(frozen, m) for m in mids]
    Z = collect(down, lambda: [ad.mlp_block(frozen, m) for m in mids])
    Zt = collect(down, lambda: [ad.mlp_block(frozen, m) for m in mids_t])
    cat = lambda ts: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]).double()  # noqa: E731
    T_o = X @ o.weight.double().T + (cat(dense) - cat(pruned) if drift else 0)
    T_d = Z @ down.weight.double().T + (cat(mids) - cat(mids_t) if drift else 0)

    # the runner sees this rank's windows 5..20 of a larger run: windows 7, 11, 15, 19 are held out
    run = LayerRunner(1, layer, ad, pruned, ctx, DEV, Timer(), reference=list(dense), drift=drift, first_window=5)
    held = torch.tensor([(5 + w) % 4 == 3 for w in range(len(torch.cat(pruned)))])
    rows = held.repeat_interleave(pruned[0].shape[1])  # window → its tokens
    H_ = lambda X: 2 * X.T @ X / X.shape[0]  # noqa: E731
    G_ = lambda X, T, W: 2 * (T - X @ W.T).T @ X / X.shape[0]  # noqa: E731
    for st, Xt_, W_, T_ in ((run.attention_statistics(holdout=4), Xt, o.weight.double(), T_o),
                            (run.mlp_statistics(holdout=4), Zt, down.weight.double(), T_d)):
        torch.testing.assert_close(st.H.double(), H_(Xt_), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.G.double(), G_(Xt_, T_, W_), rtol=1e-4, atol=1e-6)
        assert st.held is not None
        for got, want in zip(st.held, (H_(Xt_[~rows]), G_(Xt_[~rows], T_[~rows], W_), H_(Xt_[rows]),
                                             G_(Xt_[rows], T_[rows], W_))):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got = run.reference_outputs()
    assert all(torch.equal(a, b) for a, b in zip(got, outs))  # the dense layer's outputs, bitwise


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("part", ["heads", "channels"])
def test_pruned_layer_equals_the_refit_on_its_activations(tiny_llama_gqa, part: str, drift: bool) -> None:
    """SlimGPT's o_proj (heads removed) or down_proj (channels removed) under --compensate equals
    the float64 least-squares refit of its kept columns toward the dense target, on the very
    activations the layer saw (statistics → target → greedy OBS, end to end)."""
    ad, layer, ctx, pruned, dense = streams(tiny_llama_gqa)
    frozen = copy.deepcopy(layer)
    space = layer_spaces(ad)[1]
    if part == "heads":
        width, lin = LayerWidth(0, 1, space.channels, 0.0), ad.attention(frozen).o
        Xt = collect(lin, lambda: [ad.attention_block(frozen, x, ctx) for x in pruned])
        X = collect(lin, lambda: [ad.attention_block(frozen, d, ctx) for d in dense])
        resid = torch.cat([(d - x).reshape(-1, d.shape[-1]) for d, x in zip(dense, pruned)]).double()
    else:
        width, lin = LayerWidth(0, 0, space.channels - 40, 0.0), ad.mlp(frozen).down
        with torch.no_grad():
            mids = [ad.attention_block(frozen, d, ctx) for d in dense]
            mids_t = [ad.attention_block(frozen, x, ctx) for x in pruned]
        Xt = collect(lin, lambda: [ad.mlp_block(frozen, m) for m in mids_t])
        X = collect(lin, lambda: [ad.mlp_block(frozen, m) for m in mids])
        resid = torch.cat([(d - x).reshape(-1, d.shape[-1]) for d, x in zip(mids, mids_t)]).double()
    W = lin.weight.detach().double()
    p = {"W": W, "Xt": Xt, "T": X @ W.T + (resid if drift else 0)}
    run = LayerRunner(1, layer, ad, pruned, ctx, DEV, Timer(), reference=list(dense), drift=drift)
    plan = SlimGPT(ffn_groups=4, shrink=1.0).prune_layer(run, width, space)  # the whole correction
    if part == "heads":
        kept = [h * 8 + d for h in plan.kept_heads for d in range(8)]
        got, lam = ad.attention(layer).o.weight, plan.stats["attn_damp"]
    else:
        kept, got, lam = plan.kept_channels, ad.mlp(layer).down.weight, plan.stats["mlp_damp"]
    delta = lam * torch.diagonal(2 * Xt.T @ Xt / Xt.shape[0]).mean().item()
    ref = refit(p, kept, delta)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-4
    sym = copy.deepcopy(frozen)  # and it is closer to the target than the symmetric solve on the same set
    sym_lin = ad.attention(sym).o if part == "heads" else ad.mlp(sym).down
    Hinv, _ = damped_inverse((2 * Xt.T @ Xt / Xt.shape[0]).float(), lam)
    Ws = sym_lin.weight.detach().clone()
    remove_columns(Ws, Hinv, torch.tensor([c for c in range(W.shape[1]) if c not in kept]))
    assert objective(p, got.detach(), delta)[0] < objective(p, Ws, delta)[0]


def test_equal_streams_give_the_symmetric_layer_bitwise(tiny_llama_gqa) -> None:
    """X = X̃ (the dense stream is the pruned one): heads-only and channels-only prunes equal the
    symmetric ones bit for bit (with both, the MLP's dense input differs: the dense attention)."""
    ad, _, ctx, pruned, _ = streams(tiny_llama_gqa)
    space = layer_spaces(ad)[1]
    for width in (LayerWidth(1, 0, space.channels, 0.0), LayerWidth(0, 0, space.channels - 30, 0.0)):
        a, b = copy.deepcopy(ad.layers[1]), copy.deepcopy(ad.layers[1])
        pa = SlimGPT().prune_layer(LayerRunner(1, a, ad, pruned, ctx, DEV, Timer()), width, space)
        pb = SlimGPT().prune_layer(LayerRunner(1, b, ad, pruned, ctx, DEV, Timer(), reference=list(pruned)),
                                   width, space)
        assert (pa.kept_heads, pa.kept_channels) == (pb.kept_heads, pb.kept_channels)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- whole runs
def run_driver(model, ratio: float | None, method: SlimGPT | None = None, **kw):
    ad = get_adapter(model)
    spaces = layer_spaces(ad)
    widths = ([LayerWidth(0, 0, s.channels, 0.0) for s in spaces] if ratio is None
              else solve_widths(spaces, parameter_count(model), ratio, "uniform"))
    return ad, run_layerwise(ad, calib_ids(), method or SlimGPT(), widths, spaces, DEV, batch_size=4, progress=False,
                             **kw)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(calib_ids(2, 24, seed=99)).logits


@pytest.mark.parametrize("compensate", ["asymmetric", "drift"])
def test_nothing_removed_leaves_the_model_unchanged(tiny_llama, compensate: str) -> None:
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    _, res = run_driver(tiny_llama, None, compensate=compensate)
    after = shrink_model(tiny_llama, res.plans).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_symmetric_is_the_default_and_original_propagation_makes_them_equal(tiny_qwen2) -> None:
    states = {}
    for name, kw in {"default": {}, "symmetric": {"compensate": "symmetric"},
                     "asym": {"compensate": "asymmetric"},
                     "orig-sym": {"propagate": "original"},
                     "orig-asym": {"propagate": "original", "compensate": "asymmetric"}}.items():
        m = copy.deepcopy(tiny_qwen2)
        ad, res = run_driver(m, 0.3, **kw)
        states[name] = (shrink_model(m, res.plans).state_dict(), res.plans, res.activations["copies"])
    same = lambda a, b: all(torch.equal(states[a][0][k], states[b][0][k]) for k in states[a][0])  # noqa: E731
    assert same("default", "symmetric") and same("orig-sym", "orig-asym")
    # layer 0 sees the same embeddings on both streams (X = X̃): its heads and o_proj are the symmetric ones
    assert states["asym"][1][0].kept_heads == states["default"][1][0].kept_heads
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(states["asym"][0][o], states["default"][0][o])
    assert not same("default", "asym")
    assert (states["default"][2], states["asym"][2], states["orig-asym"][2]) == (3, 4, 4)
    assert activation_copies("pruned", "drift") == 4 and activation_copies("original", "asymmetric") == 4


def test_shrinkage_zero_is_symmetric_and_heldout_is_recorded(tiny_qwen2) -> None:
    """``--shrink 0`` keeps none of the correction: the symmetric model bit for bit, although the
    dense stream ran beside it; the held-out choice is a share in [0, 1] per solved linear."""
    runs = {}
    for name, method, kw in (("sym", SlimGPT(), {}), ("zero", SlimGPT(shrink=0.0), {"compensate": "asymmetric"}),
                             ("heldout", SlimGPT(), {"compensate": "asymmetric"})):
        m = copy.deepcopy(tiny_qwen2)
        _, res = run_driver(m, 0.3, method, **kw)
        runs[name] = (shrink_model(m, res.plans).state_dict(), res.plans)
    sym, zero = runs["sym"][0], runs["zero"][0]
    assert all(torch.equal(sym[k], zero[k]) for k in sym)
    shares = [v for plan in runs["heldout"][1].values() for k, v in plan.stats.items() if k.endswith("_shrink")]
    assert shares and all(0.0 <= a <= 1.0 for a in shares)
    assert "attn_shrink" not in runs["sym"][1][1].stats


def test_methods_and_models_that_cannot_compensate_are_refused(tiny_tokenizer) -> None:
    for kw in ({"method": "wanda-sp"}, {"schedule": "search", "search_final": "stitch"}):
        with pytest.raises(ConfigError, match="--compensate"):
            PruneConfig(compensate="asymmetric", **kw).validate()
    with pytest.raises(ConfigError, match="--compensate must be one of"):
        PruneConfig(compensate="dense").validate()
    for bad in ("1.5", "most", "-0.1"):
        with pytest.raises(ConfigError, match="--shrink must be"):
            PruneConfig(compensate="asymmetric", shrink=bad).validate()
    with pytest.raises(ConfigError, match="add --compensate asymmetric"):
        PruneConfig(shrink="0.5").validate()
    PruneConfig(compensate="asymmetric", shrink="0.5").validate()
    from test_gemma3 import tiny_gemma3

    with pytest.raises(ModelError, match="post-norms"):
        run_driver(tiny_gemma3(), 0.3, compensate="drift")
    ad, res = run_driver(tiny_gemma3(), 0.3, compensate="asymmetric")  # asymmetric is per linear: fine
    assert len(res.plans) == ad.num_layers


def test_memory_plans_count_the_dense_stream() -> None:
    from slimgpt.preflight import Geometry, calibration_need

    geo = Geometry.of({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                       "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152})
    assert geo is not None
    sym = calibration_need(geo, 128, 2048, 8, 4)
    asym = calibration_need(geo, 128, 2048, 8, 4, dense_stream=True)
    assert asym.activations == sym.activations * 4 // 3
    assert asym.hessians > sym.hessians and asym.batch > sym.batch


# ---------------------------------------------------------------------------------- CLI: streamed, resumed, torchrun
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[Path, list[str]]:
    from test_streaming import RUN, calib_text, save_tiny

    tmp = tmp_path_factory.mktemp("asym")
    src, calib = save_tiny(tmp / "src"), calib_text(tmp / "calib.txt")
    args = ["prune", str(src), "--calib", str(calib), *RUN, "--batch-size", "2", "--compensate", "asymmetric"]
    assert main([*args, "--out", str(tmp / "mem")]) == 0
    return tmp, args


def test_cli_in_memory_streamed_offloaded_and_resumed_agree(cli_runs) -> None:
    from test_resume import killed, resume
    from test_streaming import assert_same_weights, weights

    tmp, args = cli_runs
    report = json.loads((tmp / "mem" / "slimgpt.json").read_text())
    assert report["config"]["compensate"] == "asymmetric" and report["activations"]["copies"] == 4
    assert main([*args[:-2], "--out", str(tmp / "sym")]) == 0  # the same run, symmetric
    sym = json.loads((tmp / "sym" / "slimgpt.json").read_text())
    assert sym["params"]["pruned"] == report["params"]["pruned"]
    wa, ws = weights(tmp / "mem"), weights(tmp / "sym")
    assert any(not torch.equal(wa[k], ws[k]) for k in wa if "o_proj" in k or "down_proj" in k)
    assert main([*args, "--out", str(tmp / "st"), "--max-memory", "1KiB",
                 "--offload-activations", str(tmp / "acts")]) == 0
    assert json.loads((tmp / "st" / "slimgpt.json").read_text())["streamed"]
    assert_same_weights(tmp / "mem", tmp / "st")
    assert not (tmp / "acts").exists()  # both streams' files are cleaned up
    src, calib = Path(args[1]), Path(args[3])
    extra = ["--batch-size", "2", "--compensate", "asymmetric"]
    killed(src, calib, tmp / "resumed", 1, *extra)
    from slimgpt.checkpoint import Checkpoint

    work = Checkpoint.folder_for(tmp / "resumed")
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["inputs-00002", "reference-00002"]
    resume(src, calib, tmp / "resumed", *extra)
    assert_same_weights(tmp / "mem", tmp / "resumed")


def test_cli_two_torchrun_ranks_prune_what_one_does(cli_runs) -> None:
    from test_distributed import assert_same_model, launch

    tmp, args = cli_runs
    r0, r1 = launch(2, [*args, "--out", str(tmp / "two")])
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr[-3000:] + r1.stderr[-3000:]
    report = json.loads((tmp / "two" / "slimgpt.json").read_text())
    assert report["processes"] == 2
    layers = json.loads((tmp / "mem" / "slimgpt.json").read_text())["layers"]
    assert [(r["heads"], r["channels"]) for r in report["layers"]] == [(r["heads"], r["channels"]) for r in layers]
    assert_same_model(tmp / "mem", tmp / "two")
