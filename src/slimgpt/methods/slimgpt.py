"""SlimGPT (Ling et al. 2024): OBS structured pruning with Batched Greedy Pruning.

Per layer, attention first (heads by grouped-Cholesky scores, §4.2 / Eq. 5), then the FFN on the
outputs of the already pruned attention (channels with Dynamic Group Size). Every removal
compensates the remaining columns (Eq. 4); the per-layer widths come from the Incremental
Pruning Ratio schedule (:mod:`slimgpt.schedule`).

Compensation targets the layer's own removals on the inputs it sees (``--compensate symmetric``,
the paper's) or, when the driver keeps a dense stream beside the pruned one (``asymmetric``,
``drift``), the dense model's outputs: the removals then start from ``W* = W + G H⁻¹``
(:func:`~slimgpt.solvers.obs.compensation_target`) under the same ``H``, which also absorbs the
error the earlier, already pruned layers left in the inputs (GPTQv2's asymmetric calibration,
carried over to structured OBS). Only blocks that lose heads or channels are re-solved.
"""

from __future__ import annotations

import logging

import torch

from slimgpt.methods.base import Method
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner
from slimgpt.schedule import LayerSpace, LayerWidth
from slimgpt.solvers.channels import ChannelResult, prune_channels
from slimgpt.solvers.heads import HeadResult, HeadScore, prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.solvers.obs import compensation_target

log = logging.getLogger(__name__)


class SlimGPT(Method):
    name = "slimgpt"
    distributed = True  # Hessians via LayerRunner (reduced), solves via LayerRunner.solve
    compensates = True  # solves toward the dense stream's G when the driver keeps one

    def __init__(
        self,
        head_score: HeadScore = "gcd",
        ffn_groups: int | str = "dynamic",
        min_group: int = 8,
        max_group: int = 1024,
        damp: float = 0.01,
        solver_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.head_score = head_score
        self.ffn_groups = ffn_groups
        self.min_group, self.max_group = min_group, max_group
        self.damp = damp
        self.solver_dtype = solver_dtype

    def config(self) -> dict:
        return {
            "name": self.name,
            "head_score": self.head_score,
            "ffn_groups": self.ffn_groups,
            "min_group": self.min_group,
            "max_group": self.max_group,
            "damp": self.damp,
            "solver_dtype": str(self.solver_dtype).removeprefix("torch."),
        }

    def prune_layer(self, run: LayerRunner, width: LayerWidth, space: LayerSpace) -> LayerPlan:
        plan = LayerPlan()
        adapter, layer, i = run.adapter, run.layer, run.index
        if width.remove_groups or width.remove_per_group:
            geo = adapter.geometry(layer)
            o = adapter.attention(layer).o
            H, G = run.attention_statistics()

            def solve_heads() -> tuple[HeadResult, float]:
                Hinv, lam = damped_inverse(H, self.damp, where=f"layer {i} o_proj", dtype=self.solver_dtype)
                W = o.weight.data.to(self.solver_dtype)
                dead = dead_columns(H)
                if G is not None:
                    W = compensation_target(W, G, Hinv, dead)
                res = prune_heads(
                    W, Hinv, geo.num_heads, geo.num_kv_heads, geo.head_dim,
                    width.remove_groups, width.remove_per_group, self.head_score, dead=dead,
                )
                o.weight.data.copy_(W)
                return res, lam

            res, lam = run.solve(solve_heads, o.weight.data)  # once; shared under torchrun
            plan.kept_heads = res.kept_heads
            plan.stats["attn_error"] = sum(res.errors)
            plan.stats["attn_damp"] = lam
        if width.channels < space.channels:
            down = adapter.mlp(layer).down
            H, G = run.mlp_statistics()

            def solve_channels() -> tuple[ChannelResult, float]:
                Hinv, lam = damped_inverse(H, self.damp, where=f"layer {i} down_proj", dtype=self.solver_dtype)
                W = down.weight.data.to(self.solver_dtype)
                dead = dead_columns(H)
                if G is not None:
                    W = compensation_target(W, G, Hinv, dead)
                res = prune_channels(
                    W, Hinv, space.channels - width.channels, self.ffn_groups, self.min_group, self.max_group,
                    dead=dead,
                )
                down.weight.data.copy_(W)
                return res, lam

            cres, lam = run.solve(solve_channels, down.weight.data)
            plan.kept_channels = cres.kept
            plan.stats["mlp_error"] = sum(cres.errors)
            plan.stats["mlp_damp"] = lam
            plan.stats["mlp_groups"] = len(cres.group_sizes)
        return plan
