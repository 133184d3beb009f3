"""FFN channels with Dynamic Group Size (paper §4.2; ALGORITHMS.md §4).

Channels are single ``down_proj`` columns. Each step scores every remaining column with Eq. 4
under the current ``Hinv`` and removes the ``g`` cheapest jointly with compensation. ``g`` starts
at half of what is left to remove (at most ``max_group``) and so halves as the target nears,
down to ``min_group``; compensation reshuffles the scores, so small late groups stay close to
exact greedy OBS. ``group_size=1`` *is* exact greedy OBS; a fixed int is the '-DGS' ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimgpt.solvers.obs import column_errors, park_dead, remove_columns, restore_dead


@dataclass
class ChannelResult:
    kept: list[int]
    removed: list[int] = field(default_factory=list)  # in removal order
    group_sizes: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # exact joint error of each group


def dynamic_group_size(left: int, min_group: int = 8, max_group: int = 1024) -> int:
    """Half of what is left (so it halves step by step), clamped to ``[min_group, max_group]``."""
    return min(left, max(min_group, min(max_group, left // 2)))


def prune_channels(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    n_remove: int,
    group_size: int | str = "dynamic",
    min_group: int = 8,
    max_group: int = 1024,
    dead: torch.Tensor | None = None,
) -> ChannelResult:
    """Remove ``n_remove`` columns of ``W`` in place (compensating the rest); ``Hinv`` is downdated.

    ``dead`` (a column mask, :func:`~slimgpt.solvers.hessian.dead_columns`): inputs that are
    always zero; they cost exactly 0 and go first (see :func:`~slimgpt.solvers.obs.park_dead`).
    """
    ncols = W.shape[1]
    if not 0 <= n_remove <= ncols:
        raise ValueError(f"cannot remove {n_remove} of {ncols} channels")
    alive = torch.ones(ncols, dtype=torch.bool, device=W.device)
    result = ChannelResult(kept=[])
    left = n_remove
    saved = park_dead(W, dead)
    while left > 0:
        g = dynamic_group_size(left, min_group, max_group) if group_size == "dynamic" else min(int(group_size), left)
        err = column_errors(W.to(Hinv.dtype), Hinv)
        err[~alive] = torch.inf
        idx = torch.topk(err, g, largest=False).indices
        result.errors.append(remove_columns(W, Hinv, idx))
        alive[idx] = False
        result.removed.extend(idx.tolist())
        result.group_sizes.append(g)
        left -= g
    restore_dead(W, dead, saved, ~alive)
    result.kept = torch.nonzero(alive).flatten().tolist()
    return result
