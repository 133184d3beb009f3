"""Solvers against independent references: least-squares refits from the data itself."""

from __future__ import annotations

import pytest
import torch

from slimgpt.errors import NumericalError
from slimgpt.solvers.channels import dynamic_group_size, prune_channels
from slimgpt.solvers.heads import block_scores, prune_heads
from slimgpt.solvers.hessian import HessianAccumulator, damped_inverse, dead_columns
from slimgpt.solvers.obs import joint_error, remove_columns, remove_columns_sequential

D = torch.float64


def problem(rows=6, cols=12, tokens=200, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, tokens, generator=g, dtype=D)
    if correlated:  # realistic: correlated input features
        X = torch.randn(cols, cols, generator=g, dtype=D) @ X / cols**0.5 + 0.3 * X
    W = torch.randn(rows, cols, generator=g, dtype=D)
    acc = HessianAccumulator(cols, dtype=D)
    for chunk in X.T.split(37):
        acc.add(chunk)
    H = acc.finalize()
    return W, X, H


def refit(W, X, keep):
    """Optimal Ŵ on columns ``keep`` by least squares from data; returns (Ŵ full-size, ||WX-ŴX||²)."""
    keep = sorted(keep)
    Xr = X[keep]
    Wr = (W @ X @ Xr.T) @ torch.linalg.inv(Xr @ Xr.T)
    What = torch.zeros_like(W)
    What[:, keep] = Wr
    return What, (W @ X - What @ X).pow(2).sum().item()


def test_hessian_is_2xxt_over_n_independent_of_batching():
    W, X, H = problem()
    torch.testing.assert_close(H, 2 * X @ X.T / X.shape[1])


def test_joint_removal_equals_sequential_eq3_eq4():
    W, X, H = problem()
    Hinv, _ = damped_inverse(H, damp=0)
    cols = [7, 2, 9]
    W1, H1 = W.clone(), Hinv.clone()
    W2, H2 = W.clone(), Hinv.clone()
    remove_columns(W1, H1, torch.tensor(cols))
    remove_columns_sequential(W2, H2, cols[::-1])
    torch.testing.assert_close(W1, W2)
    torch.testing.assert_close(H1, H2)
    keep = [c for c in range(12) if c not in cols]
    # downdated Hinv equals the inverse of H restricted to the remaining columns (Eq. 3)
    torch.testing.assert_close(H1[keep][:, keep], torch.linalg.inv(H[keep][:, keep]))


def test_joint_error_and_compensation_equal_least_squares_from_data():
    W, X, H = problem()
    Hinv, _ = damped_inverse(H, damp=0)
    cols = torch.tensor([1, 4, 5, 10])
    n = X.shape[1]
    e_pred = joint_error(W, Hinv, cols)
    What = W.clone()
    e_rem = remove_columns(What, Hinv.clone(), cols)
    keep = [c for c in range(12) if c not in cols.tolist()]
    W_ref, e_ref = refit(W, X, keep)
    torch.testing.assert_close(What, W_ref)
    # trace(ΔW H ΔWᵀ) = E with H = 2XXᵀ/n, so ||WX - ŴX||² = E·n/2
    assert e_pred * n / 2 == pytest.approx(e_ref, rel=1e-8)
    assert e_rem == pytest.approx(e_pred, rel=1e-10)
    assert (W - What).matmul(X).pow(2).sum().item() == pytest.approx(e_ref, rel=1e-8)


def test_ffn_group_size_one_equals_exhaustive_greedy_obs():
    W, X, H = problem(rows=5, cols=10, seed=3)
    Hinv, _ = damped_inverse(H, damp=0)
    What = W.clone()
    res = prune_channels(What, Hinv.clone(), n_remove=6, group_size=1)
    # brute force: at every step try removing each remaining column, refit from data, keep the best
    keep, order = list(range(10)), []
    for _ in range(6):
        best = min(keep, key=lambda j: refit(W, X, [c for c in keep if c != j])[1])
        keep.remove(best)
        order.append(best)
    assert res.removed == order
    assert res.kept == sorted(keep)
    torch.testing.assert_close(What, refit(W, X, keep)[0])


def dgs_sequence(n: int, floor: int, cap: int) -> list[int]:
    sizes, left = [], n
    while left:
        sizes.append(dynamic_group_size(left, floor, cap))
        left -= sizes[-1]
    return sizes


def test_dynamic_group_size_halves_to_floor():
    """By hand: half of what is left, capped at 1024, never below the floor (the last group takes
    what remains)."""
    assert dgs_sequence(3000, 8, 1024) == [1024, 988, 494, 247, 123, 62, 31, 15, 8, 8]
    # left 3000 -> 1976 -> 988 -> 494 -> 247 -> 124 -> 62 -> 31 -> 16 -> 8 -> 0
    assert dgs_sequence(3000, 64, 1024) == [1024, 988, 494, 247, 123, 64, 60]  # the authors' floor
    assert dgs_sequence(5, 8, 1024) == [5]


def test_dynamic_groups_hit_count_and_compensate_optimally():
    W, X, H = problem(rows=4, cols=40, tokens=400, seed=5)
    Hinv, _ = damped_inverse(H, damp=0)
    What = W.clone()
    res = prune_channels(What, Hinv, n_remove=27, min_group=2, max_group=8)
    assert res.group_sizes == [8, 8, 5, 3, 2, 1]  # 27 -> 19 -> 11 -> 6 -> 3 -> 1 -> 0
    assert len(res.kept) == 13 and len(res.removed) == 27
    torch.testing.assert_close(What, refit(W, X, res.kept)[0])


def explicit_head_score(W, H, head, d):
    """Paper §4.2 without the lemmas: re-order so the head comes first, invert the *whole*
    permuted Hessian, Cholesky-factor it, read the head's diagonal."""
    n = H.shape[0]
    cols = list(range(head * d, (head + 1) * d))
    perm = cols + [c for c in range(n) if c not in cols]
    Hp = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    return sum(W[:, c].pow(2).sum().item() / U[j, j].item() ** 2 for j, c in enumerate(cols))


def test_grouped_cholesky_scores_equal_explicit_reordering():
    d, nh = 3, 4
    W, X, H = problem(rows=5, cols=d * nh, seed=7)
    Hinv, _ = damped_inverse(H, damp=0)
    blocks = torch.arange(d * nh).view(nh, d)
    got = block_scores(W, Hinv, blocks, "gcd")
    want = torch.tensor([explicit_head_score(W, H, h, d) for h in range(nh)], dtype=D)
    torch.testing.assert_close(got, want)
    # the exact variant equals the joint error refitted from data
    exact = block_scores(W, Hinv, blocks, "gcd-exact")
    n = X.shape[1]
    for h in range(nh):
        keep = [c for c in range(d * nh) if c // d != h]
        assert exact[h].item() * n / 2 == pytest.approx(refit(W, X, keep)[1], rel=1e-8)


def test_head_pruning_exact_score_is_greedy_optimal_and_gqa_balanced():
    d, nh, nkv = 2, 6, 2
    W, X, H = problem(rows=5, cols=d * nh, tokens=300, seed=11)
    Hinv, _ = damped_inverse(H, damp=0)
    What = W.clone()
    res = prune_heads(What, Hinv, nh, nkv, d, remove_per_group=2, score="gcd-exact")
    n_rep = nh // nkv
    assert len(res.kept_heads) == 2 and {h // n_rep for h in res.kept_heads} == {0, 1}
    # brute-force greedy under the same balance constraint, refitting from data at every step
    alive, hit = set(range(nh)), set()
    order = []
    for _ in range(4):
        if hit == {0, 1}:
            hit = set()
        cand = [h for h in alive if h // n_rep not in hit]
        best = min(cand, key=lambda h: refit(W, X, [c for c in range(d * nh) if c // d in alive - {h}])[1])
        order.append(best)
        alive.discard(best)
        hit.add(best // n_rep)
    assert res.removed == order
    torch.testing.assert_close(What, refit(W, X, [c for c in range(d * nh) if c // d in alive])[0])


def test_whole_group_removal_and_initial_scores():
    d, nh, nkv = 2, 6, 3
    W, X, H = problem(rows=5, cols=d * nh, tokens=300, seed=13)
    for score in ("gcd", "gcd-exact", "initial"):
        Hinv, _ = damped_inverse(H, damp=0)
        What = W.clone()
        res = prune_heads(What, Hinv, nh, nkv, d, remove_groups=1, remove_per_group=1, score=score)
        assert len(res.kept_heads) == 2
        groups = [h // 2 for h in res.kept_heads]
        assert len(set(groups)) == 2  # one whole group gone, one head left in each other group
        removed_cols = [c for c in range(d * nh) if c // d not in res.kept_heads]
        assert What[:, removed_cols].abs().max() == 0


def test_damping_retries_then_fails_clearly():
    H = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # duplicate feature: singular
    Hinv, lam = damped_inverse(H, damp=0.0)
    assert lam > 0 and torch.isfinite(Hinv).all()
    with pytest.raises(NumericalError, match="layer 3"):
        damped_inverse(torch.full((3, 3), float("nan")), where="layer 3")
    bad = -torch.eye(3)
    with pytest.raises(NumericalError, match="would not factor"):
        damped_inverse(bad, damp=0.01, max_tries=2)


@pytest.mark.parametrize(("smallest", "tries", "lam"), [(-0.02, 2, 0.1), (-0.2, 3, 1.0)])
def test_damping_retry_multiplies_lambda_by_ten(smallest, tries, lam, caplog):
    """An indefinite Hessian (as fp32 accumulation can produce) with mean diagonal m: λ = 0.01
    adds 0.01·m, too little; each retry multiplies λ by 10 until ``smallest + λ·m > 0``, and
    the result is the exact inverse of ``H + λ·m·I`` at that λ."""
    H = torch.diag(torch.tensor([1.0, 0.5, smallest], dtype=D))
    m = H.diagonal().mean()
    with pytest.raises(NumericalError):
        damped_inverse(H, damp=0.01, max_tries=tries - 1)  # fails at the first λ(s)
    with caplog.at_level("WARNING"):
        Hinv, got = damped_inverse(H, damp=0.01, max_tries=tries, where="layer 7 o_proj")
    assert got == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(Hinv, torch.linalg.inv(H + lam * m * torch.eye(3, dtype=D)))
    assert "layer 7 o_proj" in caplog.text and f"{lam:.3g}" in caplog.text


def dead_problem(dead: list[int], rows=6, cols=8, seed=0):
    """A problem whose inputs ``dead`` are zero on every token, their weights made large (so a
    solver that scores them by their weights would keep them)."""
    W, X, _ = problem(rows=rows, cols=cols, seed=seed)
    X[dead] = 0
    W[:, dead] *= 10
    H = 2 * X @ X.T / X.shape[1]
    return W, X, H


def test_dead_columns_cost_exactly_zero_and_go_first():
    W, X, H = dead_problem([3, 5])
    dead = dead_columns(H)
    assert dead.tolist() == [c in (3, 5) for c in range(8)]
    Hinv, _ = damped_inverse(H, damp=0)
    assert torch.isfinite(Hinv).all()
    What = W.clone()
    res = prune_channels(What, Hinv.clone(), n_remove=4, group_size=1, dead=dead)
    assert set(res.removed[:2]) == {3, 5} and res.errors[:2] == [0.0, 0.0]
    assert What[:, [3, 5]].abs().max() == 0
    # the live columns' compensation is unaffected: still the least-squares refit from data
    torch.testing.assert_close(What @ X, refit(W, X, res.kept)[0] @ X, rtol=1e-6, atol=1e-8)
    # a dead column that is kept keeps its weights (no compensation step touches it)
    What = W.clone()
    res = prune_channels(What, Hinv.clone(), n_remove=1, group_size=1, dead=dead)
    assert res.errors == [0.0] and res.removed[0] in (3, 5)
    other = 8 - res.removed[0]
    torch.testing.assert_close(What[:, other], W[:, other], rtol=0, atol=0)


@pytest.mark.parametrize("score", ["gcd", "gcd-exact", "initial"])
def test_dead_head_costs_exactly_zero_and_goes_first(score):
    d, nh, nkv = 2, 4, 2
    W, X, H = dead_problem([4, 5], cols=d * nh, seed=4)  # head 2 (columns 4, 5) never fires
    Hinv, _ = damped_inverse(H, damp=0.01)
    What = W.clone()
    res = prune_heads(What, Hinv, nh, nkv, d, remove_per_group=1, score=score, dead=dead_columns(H))
    assert res.removed[0] == 2 and res.errors[0] == 0.0


def paper_block_score(W: torch.Tensor, Hd: torch.Tensor, remaining: list[int], block: list[int]) -> float:
    """Paper §4.2 / Eq. 5 from scratch: invert the damped Hessian of the remaining columns,
    re-order so the block comes first, Cholesky-factor the whole inverse (upper), and sum
    ``||W_j||² / U[j, j]²`` over the block's columns."""
    order = block + [c for c in remaining if c not in block]
    Hinv = torch.linalg.inv(Hd[order][:, order])
    U = torch.linalg.cholesky(Hinv, upper=True)
    return sum(W[:, c].pow(2).sum().item() / U[j, j].item() ** 2 for j, c in enumerate(block))


@pytest.mark.parametrize(("nh", "nkv", "groups", "per_group"), [(6, 2, 0, 2), (6, 3, 1, 1)])
def test_gcd_score_every_greedy_step_equals_brute_force(nh, nkv, groups, per_group, monkeypatch):
    """The default score through the whole loop: at every step the scores the solver used equal
    the paper's score recomputed from scratch (Hinv of the remaining columns by a fresh inverse,
    W the least-squares refit from data after the removals so far), and the head it removes is
    that step's argmin under the grouped-query rule."""
    import slimgpt.solvers.heads as heads_mod

    d = 2
    W, X, H = problem(rows=5, cols=d * nh, tokens=300, seed=17)
    n_rep = nh // nkv
    used: list[tuple[list[list[int]], torch.Tensor]] = []
    real = heads_mod.block_scores

    def recording(Wc, Hinv, blocks, mode):  # the real scorer; only its inputs/outputs are kept
        out = real(Wc, Hinv, blocks, mode)
        used.append((blocks.tolist(), out.clone()))
        return out

    monkeypatch.setattr(heads_mod, "block_scores", recording)
    Hinv, _ = damped_inverse(H, damp=0)
    res = prune_heads(W.clone(), Hinv, nh, nkv, d, remove_groups=groups, remove_per_group=per_group, score="gcd")

    alive = set(range(nh))
    order: list[int] = []
    for step, (blocks, scores) in enumerate(used):
        remaining = [c for c in range(d * nh) if c // d in alive]
        Wr = refit(W, X, remaining)[0]
        want = torch.tensor([paper_block_score(Wr, H, remaining, b) for b in blocks], dtype=D)
        torch.testing.assert_close(scores, want, rtol=1e-7, atol=1e-10, msg=f"step {step}")
        best = blocks[int(torch.argmin(want))]
        assert sorted(want.tolist())[1] - want.min().item() > 1e-6  # the choice is not a near-tie
        heads = sorted({c // d for c in best})
        order += heads
        alive -= set(heads)
    assert len(used) == groups + per_group * (nkv - groups)
    assert res.removed == order
    assert all(len({h // n_rep for h in order[groups * n_rep:][r * (nkv - groups):(r + 1) * (nkv - groups)]})
               == nkv - groups for r in range(per_group))  # each round takes one head per group


def test_initial_score_ablation_orders_by_the_initial_inverse():
    """'-GCD' (``score='initial'``): every choice by ``Σ ||W_j||² / Hinv0[j, j]`` of the *initial*
    W and inverse (computed here independently), never re-scored; and that order differs from
    the re-scored default on this problem, so the test tells them apart."""
    d, nh = 2, 6
    W, X, H = problem(rows=5, cols=d * nh, tokens=300, seed=2)
    Hinv0 = torch.linalg.inv(H)
    initial = [sum(W[:, c].pow(2).sum().item() / Hinv0[c, c].item() for c in range(h * d, h * d + d))
               for h in range(nh)]
    want = sorted(range(nh), key=initial.__getitem__)[:4]
    # one key/value group holding all heads: balanced rounds take one head each, in score order
    runs = {}
    for score in ("initial", "gcd"):
        Hinv, _ = damped_inverse(H, damp=0)
        runs[score] = prune_heads(W.clone(), Hinv, nh, 1, d, remove_per_group=4, score=score).removed
    assert runs["initial"] == want
    assert runs["gcd"] != want
    # whole groups: ranked by the sum of their heads' initial scores
    Hinv, _ = damped_inverse(H, damp=0)
    res = prune_heads(W.clone(), Hinv, nh, 3, d, remove_groups=2, score="initial")
    by_group = sorted(range(3), key=lambda g: initial[2 * g] + initial[2 * g + 1])[:2]
    assert res.removed == [h for g in by_group for h in (2 * g, 2 * g + 1)]
