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
carried over to structured OBS). Only blocks that lose heads or channels are re-solved. How much
of the correction ``G H⁻¹`` is applied is chosen per linear on held-out calibration windows
(``shrink=None``, :func:`~slimgpt.solvers.obs.heldout_shrinkage`) or fixed (``shrink=α``).
"""

from __future__ import annotations

import logging

import torch

from slimgpt.methods.base import Method
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner, Statistics
from slimgpt.schedule import LayerSpace, LayerWidth
from slimgpt.solvers.channels import ChannelResult, prune_channels
from slimgpt.solvers.heads import HeadResult, HeadScore, prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.solvers.obs import compensation_target, heldout_shrinkage

log = logging.getLogger(__name__)
HOLDOUT = 4  # --compensate asymmetric: a quarter of the windows choose how much of the correction to keep


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
        shrink: float | None = None,
    ) -> None:
        self.head_score = head_score
        self.ffn_groups = ffn_groups
        self.min_group, self.max_group = min_group, max_group
        self.damp = damp
        self.solver_dtype = solver_dtype
        self.shrink = shrink  # asymmetric compensation: None = chosen on held-out windows, else this share

    @property
    def holdout(self) -> int:
        """Every k-th calibration window is held out of the fit that chooses the shrinkage (0: none)."""
        return HOLDOUT if self.shrink is None else 0

    def config(self) -> dict:
        return {
            "name": self.name,
            "head_score": self.head_score,
            "ffn_groups": self.ffn_groups,
            "min_group": self.min_group,
            "max_group": self.max_group,
            "damp": self.damp,
            "solver_dtype": str(self.solver_dtype).removeprefix("torch."),
            "shrink": "heldout" if self.shrink is None else self.shrink,
        }

    def _target(self, W: torch.Tensor, st: Statistics, Hinv: torch.Tensor, dead: torch.Tensor,
                where: str) -> tuple[torch.Tensor, float | None]:
        """The weights the OBS removals start from: ``W`` itself (symmetric), or ``W + α G H⁻¹``
        (asymmetric) with ``α`` the fixed ``shrink`` or the held-out choice (1 when the run has
        too few windows to hold any out)."""
        if st.G is None:
            return W, None
        alpha = 1.0 if self.shrink is None else self.shrink
        if self.shrink is None and st.held is not None:
            H_fit, G_fit, H_held, G_held = st.held
            Hinv_fit, _ = damped_inverse(H_fit, self.damp, where=f"{where} (fit windows)", dtype=self.solver_dtype)
            alpha = heldout_shrinkage(G_fit, Hinv_fit, G_held, H_held)
            del Hinv_fit
        G = st.G if alpha == 1.0 else st.G * alpha
        return compensation_target(W, G, Hinv, dead), alpha

    def prune_layer(self, run: LayerRunner, width: LayerWidth, space: LayerSpace) -> LayerPlan:
        plan = LayerPlan()
        adapter, layer, i = run.adapter, run.layer, run.index
        if width.remove_groups or width.remove_per_group:
            geo = adapter.geometry(layer)
            o = adapter.attention(layer).o
            st = run.attention_statistics(holdout=self.holdout)

            def solve_heads() -> tuple[HeadResult, float, float | None]:
                Hinv, lam = damped_inverse(st.H, self.damp, where=f"layer {i} o_proj", dtype=self.solver_dtype)
                dead = dead_columns(st.H)
                W, alpha = self._target(o.weight.data.to(self.solver_dtype), st, Hinv, dead, f"layer {i} o_proj")
                res = prune_heads(
                    W, Hinv, geo.num_heads, geo.num_kv_heads, geo.head_dim,
                    width.remove_groups, width.remove_per_group, self.head_score, dead=dead,
                )
                o.weight.data.copy_(W)
                return res, lam, alpha

            res, lam, alpha = run.solve(solve_heads, o.weight.data)  # once; shared under torchrun
            del st
            plan.kept_heads = res.kept_heads
            plan.stats["attn_error"] = sum(res.errors)
            plan.stats["attn_damp"] = lam
            if alpha is not None:
                plan.stats["attn_shrink"] = alpha
        if width.channels < space.channels:
            down = adapter.mlp(layer).down
            st = run.mlp_statistics(holdout=self.holdout)

            def solve_channels() -> tuple[ChannelResult, float, float | None]:
                Hinv, lam = damped_inverse(st.H, self.damp, where=f"layer {i} down_proj", dtype=self.solver_dtype)
                dead = dead_columns(st.H)
                W, alpha = self._target(down.weight.data.to(self.solver_dtype), st, Hinv, dead, f"layer {i} down_proj")
                res = prune_channels(
                    W, Hinv, space.channels - width.channels, self.ffn_groups, self.min_group, self.max_group,
                    dead=dead,
                )
                down.weight.data.copy_(W)
                return res, lam, alpha

            cres, lam, alpha = run.solve(solve_channels, down.weight.data)
            del st
            plan.kept_channels = cres.kept
            plan.stats["mlp_error"] = sum(cres.errors)
            plan.stats["mlp_damp"] = lam
            if alpha is not None:
                plan.stats["mlp_shrink"] = alpha
            plan.stats["mlp_groups"] = len(cres.group_sizes)
        return plan
