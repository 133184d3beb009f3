"""Units, ladders of levels, the budget lattice and the level-switch mutation (ALGORITHMS.md §9).

A *unit* is one residual block: unit ``2i`` is layer ``i``'s attention, ``2i+1`` its FFN (the same
numbering as BlockPruner). Each unit has a ladder of levels, level 0 = dense, the top level = the
block removed, and the parameters removed strictly increasing along it:

* attention: the GQA-valid shapes (``remove_groups`` whole key/value groups, then
  ``remove_per_group`` query heads from each remaining group); shapes that remove the same number
  of parameters share one level (the database keeps the one with the lower OBS error);
* FFN: kept channel counts on a grid ``C, C-g, C-2g, ..., 0`` (``g`` = the OBS group of the
  database's greedy path).

**How many levels.** ``--search-levels N`` (default :data:`DEFAULT_LEVELS`) keeps ``N + 1`` points
per sub-layer, evenly spaced in kept parameters (100 %, 90 %, ..., 0 % at ``N = 10``: 9 stored
variants, Týr-the-Pruner's count), each the nearest GQA shape or grid width: the database then
grows as ``N`` times a layer's output projections instead of as ``F²/g``
(:func:`attention_levels`, :func:`ffn_ladder`). An explicit ``--search-ffn-step s`` restores the
earlier full ladders (every GQA shape, every ``s`` channels).

**The budget.** Head steps are coarse (SmolLM2: one query or key/value head = 73,728 parameters
= 42.7 FFN channels), so no ladder can make every step equal. The search therefore keeps every
candidate on the *lattice* ``|removed - budget| <= F/2`` (``F`` = the largest FFN level step in
parameters) and :func:`widths_for` lands each lattice point on the budget with a fix-up of at most
half that step in one layer (warned in one line when no FFN can take it): every candidate's widths remove the budget to within half a channel (the
same guarantee as the log schedule's solve; exactly the budget when it is a whole number of
channels away). A mutation (:func:`mutate`) is an EvoPress level switch generalised to unequal
steps: one unit goes up a level, then other units go down a level until the total is back under
``budget + F/2``, then FFN units go up (steps ``<= F``) until it is above ``budget - F/2``; with
equal FFN steps on both sides it is exactly EvoPress's switch (one up, one down, total unchanged).

**Serving targets.** Under ``--target`` (a :class:`~slimgpt.serving.Constraint`) the ladders hold
only shapes the engine serves, so every lattice point, mutation and repair stays servable: vLLM's
attention ladder stops at the narrowest kept attention instead of the removed block (its top
level is then a stored variant); SGLang's has the dense and the removed attention only; FFN
levels are multiples of the route's unit (256 for SGLang) and the fix-up moves whole units.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from math import lcm

from slimgpt.schedule import LayerSpace, LayerWidth, attention_allowed
from slimgpt.serving import Constraint

log = logging.getLogger(__name__)

DEFAULT_LEVELS = 10  # points 100 %, 90 %, ..., 0 % kept: 9 stored variants per sub-layer
GRID_GROUPS = (64, 32, 16, 8, 4, 2, 1)


def attention_shapes(s: LayerSpace, constraint: Constraint | None = None) -> list[tuple[int, list[tuple[int, int]]]]:
    """``(params removed, [(remove_groups, remove_per_group), ...])`` for every distinct removal
    ``constraint`` allows, ascending; without one the last entry removes the whole attention block."""
    by_removed: dict[int, list[tuple[int, int]]] = {}
    for g in range(s.num_kv_heads + 1):
        for r in range(s.n_rep + 1):
            if not attention_allowed(s, g, r, constraint, whole_blocks=True):
                continue
            w = LayerWidth(g, r, s.channels, 0.0)
            if w.heads(s) == 0:
                g, r = s.num_kv_heads, 0  # every empty attention is one shape
            removed = s.params - LayerWidth(g, r, s.channels, 0.0).params(s)
            shapes = by_removed.setdefault(removed, [])
            if (g, r) not in shapes:
                shapes.append((g, r))
    return sorted(by_removed.items())


def ffn_channels(s: LayerSpace, step: int) -> list[int]:
    """Kept channel counts of the FFN grid: ``C, C-step, ..., 0``."""
    levels = list(range(s.channels, 0, -step))
    return [*levels, 0]


def _spaced(values: list[int], total: int, levels: int) -> list[int]:
    """Indices into ascending ``values`` (0 … ``total``) nearest ``k·total/levels``, deduplicated;
    the first and the last always included."""
    picked = {0, len(values) - 1}
    for k in range(1, levels):
        want = k * total / levels
        picked.add(min(range(len(values)), key=lambda j: (abs(values[j] - want), j)))
    return sorted(picked)


def ffn_group(channels: int, levels: int) -> int:
    """The OBS group (grid step) of the FFN path for ``levels`` levels: the largest of 64, 32, …, 1
    at most half a level's width, so every level lands within a quarter level of its target."""
    return next(g for g in GRID_GROUPS if g <= max(1.0, channels / (2 * levels)))


def ffn_ladder(s: LayerSpace, levels: int, group: int, unit: int = 1) -> list[int]:
    """Kept channels of the FFN levels (descending, ``C`` … 0): grid widths (multiples of ``unit``)
    nearest ``C·k/levels``."""
    grid = [c for c in ffn_channels(s, group)[::-1] if c % unit == 0]  # ascending kept channels
    return [grid[j] for j in _spaced(grid, s.channels, levels)][::-1]


def attention_levels(s: LayerSpace, levels: int | None, constraint: Constraint | None = None,
                     ) -> list[tuple[int, list[tuple[int, int]]]]:
    """The :func:`attention_shapes` entries kept as levels: all of them (``None``), else the ones
    whose kept parameters are nearest ``k/levels`` of the attention's (dense and removed always)."""
    shapes = attention_shapes(s, constraint)
    if levels is None:
        return shapes
    total = shapes[-1][0]
    return [shapes[j] for j in _spaced([r for r, _ in shapes], total, levels)]


def ladders(s: LayerSpace, levels: int | None, ffn_step: int | None = None, constraint: Constraint | None = None,
            ) -> tuple[list[tuple[int, list[tuple[int, int]]]], list[int], int]:
    """A layer's attention levels, FFN kept channels and FFN path group: ``levels`` points evenly
    spaced in kept parameters, or (an explicit ``ffn_step``) every GQA shape and every step;
    only what ``constraint`` serves (FFN levels on the path's grid, in its unit)."""
    unit = constraint.ffn_unit if constraint is not None else 1
    if s.channels % unit:
        raise ValueError(f"an FFN of {s.channels} channels has no ladder in multiples of {unit}")
    if ffn_step:
        return attention_shapes(s, constraint), ffn_channels(s, lcm(ffn_step, unit)), ffn_step
    if levels is None or levels < 2:
        raise ValueError("give --search-levels >= 2 or an explicit --search-ffn-step")
    group = ffn_group(s.channels, levels)
    if unit > 1 and unit % group:  # the grid must pass through every multiple of the unit
        group = next(g for g in GRID_GROUPS if unit % g == 0 and g <= group)
    return attention_levels(s, levels, constraint), ffn_ladder(s, levels, group, unit), group


@dataclass
class Problem:
    """The search space: per unit the parameters removed at each level, and the budget."""

    removed: list[list[int]]  # removed[u][level], strictly increasing, removed[u][0] == 0
    is_ffn: list[bool]
    budget: float  # parameters to remove
    tol: float  # lattice tolerance: half the largest FFN step, in parameters
    keep_attention: bool = False  # some attention below its top (removed) level: one head count needs a layer with heads
    leading_attention: bool = False  # the first unit below its top level is an attention (vLLM's DeciLM)

    @property
    def units(self) -> int:
        return len(self.removed)

    def top(self, u: int) -> int:
        return len(self.removed[u]) - 1

    def total(self, levels: list[int]) -> int:
        return sum(r[lv] for r, lv in zip(self.removed, levels))

    def feasible(self, levels: list[int]) -> bool:
        return abs(self.total(levels) - self.budget) <= self.tol

    def valid(self, levels: list[int]) -> bool:
        """Servable: with ``keep_attention``, not every attention block removed; with
        ``leading_attention``, the first block kept is an attention (units run in block order)."""
        if not (self.keep_attention or self.leading_attention):
            return True
        kept = [u for u, lv in enumerate(levels) if lv < self.top(u)]
        if self.keep_attention and all(self.is_ffn[u] for u in kept):
            return False
        return not (self.leading_attention and kept and self.is_ffn[kept[0]])

    def valid_up(self, levels: list[int], u: int) -> bool:
        """:meth:`valid` for ``levels`` with unit ``u`` one level up (free without a target)."""
        if not (self.keep_attention or self.leading_attention):
            return True
        return self.valid([lv + (v == u) for v, lv in enumerate(levels)])

    def step(self, u: int, level: int) -> int:
        """Parameters unit ``u`` removes going from ``level`` to ``level + 1``."""
        return self.removed[u][level + 1] - self.removed[u][level]


def make_problem(spaces: list[LayerSpace], budget: float, ffn_step: int | None = None,
                 attn_removed: list[list[int]] | None = None, ffn_kept: list[list[int]] | None = None,
                 constraint: Constraint | None = None) -> Problem:
    """The problem for ``spaces``: the ladders of a database (``attn_removed``, ``ffn_kept``, as
    :class:`~slimgpt.search.database.LevelDatabase` names them), or every GQA shape and every
    ``ffn_step`` channels (only those ``constraint`` serves; on the deci route some attention must
    stay, and the first block kept must be one: :meth:`Problem.valid`)."""
    removed: list[list[int]] = []
    is_ffn: list[bool] = []
    big_step = 0
    if ffn_kept is None and ffn_step is None:
        raise ValueError("give the FFN ladders or a step")
    for i, s in enumerate(spaces):
        removed.append(attn_removed[i] if attn_removed else [r for r, _ in attention_shapes(s, constraint)])
        ch = ffn_kept[i] if ffn_kept is not None else ladders(s, None, int(ffn_step or 0), constraint)[1]
        removed.append([(s.channels - c) * s.per_channel for c in ch])
        is_ffn += [False, True]
        big_step = max(big_step, max(b - a for a, b in zip(removed[-1], removed[-1][1:])))
    total = sum(r[-1] for r in removed)
    if not 0 < budget < total:
        raise ValueError(f"budget {budget:.0f} outside (0, {total})")
    removes_attention = constraint is not None and not constraint.keep_attention
    return Problem(removed, is_ffn, budget, big_step / 2, removes_attention and constraint.uniform_heads,
                   removes_attention and constraint.leading_attention)


def repair(p: Problem, levels: list[int], rng: random.Random, frozen_up: set[int] | frozenset = frozenset(),
           ) -> list[int] | None:
    """Bring ``levels`` back onto the lattice: lower random units (not ``frozen_up``) while the
    total is above ``budget + tol``, then raise random FFN units with steps ``<= 2·tol`` (not one
    just lowered) while it is below ``budget - tol``. ``None`` when no unit can move."""
    new = list(levels)
    lowered: set[int] = set()
    total = p.total(new)
    while total > p.budget + p.tol:
        down = [u for u in range(p.units) if new[u] > 0 and u not in frozen_up]
        if not down:
            return None
        b = rng.choice(down)
        new[b] -= 1
        total -= p.step(b, new[b])
        lowered.add(b)
    while total < p.budget - p.tol:
        up = [u for u in range(p.units) if p.is_ffn[u] and new[u] < p.top(u) and u not in lowered
              and p.step(u, new[u]) <= 2 * p.tol]
        if not up:
            return None
        c = rng.choice(up)
        total += p.step(c, new[c])
        new[c] += 1
    return new


def mutate(p: Problem, levels: list[int], rng: random.Random, tries: int = 50) -> list[int] | None:
    """One level switch (see the module docstring): a random unit up one level, the total
    repaired onto the lattice. ``None`` if ``tries`` draws all fail or change nothing."""
    for _ in range(tries):
        up = [u for u in range(p.units) if levels[u] < p.top(u)]
        if not up:
            return None
        a = rng.choice(up)
        new = list(levels)
        new[a] += 1
        new = repair(p, new, rng, frozen_up={a})
        if new is not None and new != levels and p.valid(new):
            return new
    return None


def nearest_levels(p: Problem, removed: list[int]) -> list[int]:
    """Per unit, the level whose removal is nearest ``removed[u]`` (ties: the lower level)."""
    return [min(range(len(r)), key=lambda lv: (abs(r[lv] - want), lv)) for r, want in zip(p.removed, removed)]


@dataclass(frozen=True)
class Allocation:
    """Final per-layer widths of a lattice point after the channel fix-up."""

    widths: list[LayerWidth]
    fixup_layer: int | None  # the layer whose FFN is off its ladder point, if any
    fixup_channels: int  # channels the fix-up removed (negative: gave back)


def widths_for(p: Problem, spaces: list[LayerSpace], levels: list[int],
               attn_shapes: list[list[tuple[int, int]]], ffn_levels: list[list[int]], unit: int = 1) -> Allocation:
    """The widths of lattice point ``levels``, fixed up onto the budget (module docstring).

    ``attn_shapes[i][level]`` is layer ``i``'s chosen ``(remove_groups, remove_per_group)`` and
    ``ffn_levels[i][level]`` its kept channels. The fix-up goes to the FFN that keeps the most
    channels and can absorb it (ties: the deepest), never reviving or emptying a block; it moves
    whole multiples of ``unit`` channels (the target's FFN unit), so the total lands within half
    a unit of the budget."""
    widths = []
    for i, s in enumerate(spaces):
        g, r = attn_shapes[i][levels[2 * i]]
        ch = ffn_levels[i][levels[2 * i + 1]]
        w = LayerWidth(g, r, ch, 0.0)
        widths.append(LayerWidth(g, r, ch, 1 - w.params(s) / s.params))
    residual = p.budget - p.total(levels)
    best: tuple[int, int] | None = None
    k_best = 0
    for i, s in enumerate(spaces):
        k = round(residual / (s.per_channel * unit)) * unit if s.per_channel else 0
        c = widths[i].channels
        if k != 0 and c > 0 and 0 < c - k <= s.channels and (best is None or (c, i) > best):
            best, k_best = (c, i), k
    if best is None:
        worst = unit * min(s.per_channel for s in spaces if s.per_channel) / 2 if spaces else 0
        if abs(residual) > worst:
            log.warning("the channel fix-up found no FFN to absorb %+.0f parameters: the allocation is off the "
                        "budget by that much (every FFN is empty or too narrow); lower --ratio or raise "
                        "--search-levels", residual)
        return Allocation(widths, None, 0)
    i = best[1]
    s, w = spaces[i], widths[i]
    ch = w.channels - k_best
    kept = LayerWidth(w.remove_groups, w.remove_per_group, ch, 0.0).params(s)
    widths[i] = LayerWidth(w.remove_groups, w.remove_per_group, ch, 1 - kept / s.params)
    return Allocation(widths, i, k_best)
