"""Batched Greedy Pruning of attention heads (paper §4.2, Eq. 5; ALGORITHMS.md §3).

A head is a block of ``head_dim`` consecutive ``o_proj`` columns. Each step scores every
remaining head at once from the diagonal blocks of the current ``Hinv`` (one batched Cholesky:
by the paper's lemmas, block ``h``'s factor equals what a full re-ordering with ``h`` first
would give), removes the cheapest head jointly with compensation, and repeats.

Grouped-query attention: query head ``i`` reads key/value head ``i // n_rep``, and stock
modelling code needs the same number of query heads in every key/value group. So a layer's
removal is ``remove_groups`` whole key/value groups (a block of ``n_rep·head_dim`` columns,
which also frees the group's k/v rows), then ``remove_per_group`` rounds that take one query
head from every remaining group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from slimgpt.solvers.obs import park_dead, remove_columns, restore_dead

HeadScore = Literal["gcd", "gcd-exact", "initial"]


@dataclass
class HeadResult:
    kept_heads: list[int]
    removed: list[int] = field(default_factory=list)  # query heads, in removal order
    errors: list[float] = field(default_factory=list)  # exact joint error of each removal step


def block_scores(W: torch.Tensor, Hinv: torch.Tensor, blocks: torch.Tensor, mode: HeadScore) -> torch.Tensor:
    """Error estimate of removing each block of columns (``blocks``: ``(nb, bs)`` indices).

    ``gcd``: the paper's Eq. 5 score, ``Σ_j ||W_j||² / U[j,j]²`` with ``U`` the Cholesky factor of
    the block's ``Hinv`` (W not updated inside the block). ``gcd-exact``: the exact joint OBS
    error ``||W_B U⁻¹||²`` from the same factor (one batched triangular solve).
    ``initial``: ``Σ_j ||W_j||² / Hinv[j,j]``, the '-GCD' ablation when given the initial Hinv.
    """
    Wb = W.T[blocks].to(Hinv.dtype)  # (nb, bs, rows)
    if mode == "initial":
        return (Wb.pow(2).sum(-1) / torch.diagonal(Hinv)[blocks]).sum(-1)
    Hb = Hinv[blocks.unsqueeze(-1), blocks.unsqueeze(-2)]  # (nb, bs, bs) diagonal blocks
    L = torch.linalg.cholesky(Hb)  # lower: Hb = L Lᵀ, diag(L) = diag of the upper factor
    if mode == "gcd":
        return (Wb.pow(2).sum(-1) / torch.diagonal(L, dim1=-2, dim2=-1).pow(2)).sum(-1)
    if mode == "gcd-exact":
        return torch.linalg.solve_triangular(L, Wb, upper=False).pow(2).sum((-1, -2))
    raise ValueError(f"unknown head score {mode!r}")


def prune_heads(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    remove_groups: int = 0,
    remove_per_group: int = 0,
    score: HeadScore = "gcd",
    dead: torch.Tensor | None = None,
) -> HeadResult:
    """Prune ``o_proj`` weights ``W`` (rows, num_heads·head_dim) in place; ``Hinv`` is downdated.

    Removes ``remove_groups`` whole key/value groups first, then ``remove_per_group`` query
    heads from each remaining group. With ``score='initial'`` every choice uses the scores of
    the initial ``W``/``Hinv`` (no re-scoring), as the paper's '-GCD' ablation. ``dead``: a
    column mask of always-zero inputs, which cost exactly 0 (:func:`~slimgpt.solvers.obs.park_dead`).
    """
    n_rep = num_heads // num_kv_heads
    if not (0 <= remove_groups <= num_kv_heads and 0 <= remove_per_group <= n_rep):
        raise ValueError("remove_groups/remove_per_group out of range")
    cols = torch.arange(num_heads * head_dim, device=W.device).view(num_heads, head_dim)
    alive = torch.ones(num_heads, dtype=torch.bool)
    result = HeadResult(kept_heads=[])
    saved = park_dead(W, dead)
    initial_head = block_scores(W, Hinv, cols, "initial") if score == "initial" else None

    def remove(heads: list[int]) -> None:
        idx = cols[heads].reshape(-1)
        result.errors.append(remove_columns(W, Hinv, idx))
        result.removed.extend(heads)
        alive[heads] = False

    # 1. whole key/value groups
    for _ in range(remove_groups):
        groups = [g for g in range(num_kv_heads) if alive[g * n_rep]]
        blocks = torch.stack([cols[g * n_rep : (g + 1) * n_rep].reshape(-1) for g in groups])
        if initial_head is not None:
            s = torch.stack([initial_head[g * n_rep : (g + 1) * n_rep].sum() for g in groups])
        else:
            s = block_scores(W, Hinv, blocks, score)
        g = groups[int(torch.argmin(s))]
        remove(list(range(g * n_rep, (g + 1) * n_rep)))

    # 2. balanced rounds: one query head from every remaining group per round
    if remove_per_group and n_rep:
        live_groups = [g for g in range(num_kv_heads) if alive[g * n_rep : (g + 1) * n_rep].any()]
        for _ in range(remove_per_group):
            todo = set(live_groups)
            while todo:
                cand = [h for h in range(num_heads) if alive[h] and h // n_rep in todo]
                if initial_head is not None:
                    s = initial_head[cand]
                else:
                    s = block_scores(W, Hinv, cols[cand], score)
                h = cand[int(torch.argmin(s))]
                remove([h])
                todo.discard(h // n_rep)

    restore_dead(W, dead, saved, ~alive.to(W.device).repeat_interleave(head_dim))
    result.kept_heads = [h for h in range(num_heads) if alive[h]]
    return result
