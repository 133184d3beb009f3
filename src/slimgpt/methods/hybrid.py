"""``slimgpt+blockpruner``: depth and width pruning under one parameter budget.

The budget is ``--ratio`` of all parameters. BlockPruner first removes whole attention / MLP
blocks worth ``--depth-share`` of it (nearest whole blocks), then SlimGPT prunes heads and
channels of the blocks that are left so the total lands on the budget.

The width schedule is solved only over what is still there: a removed attention block counts as
zero parameters (``per_q_head = per_kv_head = 0``, so the rounding keeps every head and SlimGPT
never touches it), a removed MLP as zero channels, and a layer with both blocks gone leaves the
Incremental Pruning Ratio curve altogether (the log curve runs over the remaining layers). The
layer-wise driver then runs on the depth-pruned model: the removed blocks' output weights are
already zero, so every Hessian is collected on the activations the final model will see.

**Serving targets.** Block removal and head pruning together are what no engine serves: vLLM's
Transformers backend keeps every attention, its DeciLM route (and SGLang's) one head count. Under
``--target vllm|sglang`` the hybrid prunes for the deci route: the block search stays free (whole
attention and MLP blocks) and the width part prunes no heads, FFN channels only (in multiples of
256 for SGLang). The other choice (MLP blocks only, heads pruned) gives up the cheapest removals:
attention blocks are what BlockPruner removes first, and at 20 % FFN-only widths won
``--schedule auto`` on SmolLM2 and Qwen2.5 (docs/auto_schedule.md), so the width part loses little.
A model with no deci mapping (Gemma 3, sliding windows) takes that other choice under vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from slimgpt.errors import ConfigError
from slimgpt.methods.base import GlobalMethod, Method, PruneContext
from slimgpt.methods.blockpruner import (
    SearchResult,
    block_constraint,
    block_params,
    removal_plans,
    run_search,
)
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerSpace, LayerWidth, solve_widths

log = logging.getLogger(__name__)


def remaining_spaces(spaces: list[LayerSpace], removed: list[int]) -> list[LayerSpace]:
    """``spaces`` with removed blocks counted as already gone (see the module docstring)."""
    out = list(spaces)
    for b in removed:
        s = out[b // 2]
        out[b // 2] = replace(s, per_q_head=0, per_kv_head=0) if b % 2 == 0 else replace(s, channels=0)
    return out


class SlimGPTBlockPruner(GlobalMethod):
    """BlockPruner for ``depth_share`` of the removed parameters, then a layer-wise width method
    (SlimGPT) for the rest."""

    name = "slimgpt+blockpruner"
    distributed = True  # the block search and the layer-wise pass both split their windows
    resumable = True  # the block search journals its rounds; the width pass is redone on resume

    def __init__(self, width: Method, depth_share: float = 0.5) -> None:
        if not 0 <= depth_share <= 1:
            raise ConfigError(f"--depth-share must be within [0, 1]; got {depth_share}")
        self.width, self.depth_share = width, depth_share
        self.result: SearchResult | None = None
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> SlimGPTBlockPruner:
        from slimgpt.methods import METHODS

        return cls(METHODS["slimgpt"](cfg), cfg.depth_share)

    def config(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "depth_share": self.depth_share, "width": self.width.config()}
        d.update(self.summary)
        if self.result is not None:
            d["search"] = self.result.as_dict()
        return d

    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        cfg, adapter = ctx.cfg, ctx.adapter
        budget = cfg.ratio * ctx.dense_params
        depth_target = self.depth_share * budget
        constraint = block_constraint(ctx)  # --target: one route for both parts (module docstring)
        removed: list[int] = []
        if depth_target > 0:
            self.result = run_search(ctx, target_params=depth_target, allow_none=True, constraint=constraint)
            removed = self.result.removed
        plans = removal_plans(adapter, removed)
        depth_removed = sum(block_params(ctx.spaces, b) for b in removed)
        rest = budget - depth_removed

        spaces = remaining_spaces(ctx.spaces, removed)
        widths = [LayerWidth(0, 0, s.channels, 0.0) for s in spaces]
        alive = [i for i, s in enumerate(spaces) if s.params > 0]
        self.summary = {"depth_params_removed": depth_removed, "width_params_target": max(rest, 0.0)}
        if rest > 0 and alive:
            # the width part keeps the paper's schedule: auto/search score whole models, not a remainder
            schedule = "log" if cfg.schedule in ("auto", "search") else cfg.schedule
            solved = solve_widths([spaces[i] for i in alive], ctx.dense_params, rest / ctx.dense_params,
                                  schedule, cfg.first_ratio, constraint=constraint)
            for i, w in zip(alive, solved):
                widths[i] = w
            log.info("width: removing %s more parameters with %s over %d layers", f"{round(rest):,}",
                     self.width.name, len(alive))
            for i, p in ctx.run_layers(self.width, widths, spaces).items():
                depth = plans.get(i)
                if depth is not None:  # a removed block stays removed whatever the width pass kept
                    p.kept_heads = depth.kept_heads if depth.kept_heads is not None else p.kept_heads
                    p.kept_channels = depth.kept_channels if depth.kept_channels is not None else p.kept_channels
                plans[i] = p
        return plans
