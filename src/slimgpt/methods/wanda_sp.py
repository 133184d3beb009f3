"""Wanda-sp: Wanda's ``|W|·||x||`` (Sun et al. 2023) summed over a structure, the structured
baseline of the FLAP paper (An et al. 2024, §4.1). A head or channel is scored on the side of the
layer that consumes it: ``Σ_i |W[i, j]| · ||x_j||₂`` over the o_proj columns of a head / the
down_proj column of a channel, ``x_j`` that column's input over all calibration tokens. No
compensation; SlimGPT's per-layer widths, so only the choice of structures differs.

Layer-wise like SlimGPT: attention first, then the MLP's statistics after the pruned attention,
and the pruned layer's outputs feed the next layer.

Against FLAP's released ``prune_wanda_sp`` (CASIA-IVA-Lab/FLAP, lib/prune.py): its score is
``mean_i |W[i, j]| · sqrt(mean over sequences of ||x_j||²)`` summed over a head's columns, which
is ours times a factor common to every column of a layer (rows, calibration size), so the
ranking within a layer is the same. Two deliberate differences: the code takes the MLP's
statistics in the same pass as the attention's (from the *unpruned* attention of that layer),
and removes the same share of heads and channels in every layer (``--pruning_ratio`` per
layer); we take them after the pruned attention, and use SlimGPT's per-layer widths, so that
against SlimGPT only the choice of structures differs.
"""

from __future__ import annotations

import torch

from slimgpt.methods.base import Method
from slimgpt.methods.scoring import attention_input_stats, mlp_input_stats, prune_with_scores
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner
from slimgpt.schedule import LayerSpace, LayerWidth


def wanda_column_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Per input column ``j``: ``Σ_i |W[i, j]| · ||x_j||₂``."""
    return weight.detach().abs().to(torch.float64).sum(0) * norms.to(weight.device, torch.float64)


class WandaSP(Method):
    name = "wanda-sp"

    def head_scores(self, run: LayerRunner) -> torch.Tensor:
        """Per query head: the sum of its o_proj columns' scores."""
        o = run.adapter.attention(run.layer).o
        cols = wanda_column_scores(o.weight, attention_input_stats(run).norm)
        return cols.reshape(-1, run.adapter.geometry(run.layer).head_dim).sum(1)

    def channel_scores(self, run: LayerRunner) -> torch.Tensor:
        return wanda_column_scores(run.adapter.mlp(run.layer).down.weight, mlp_input_stats(run).norm)

    def prune_layer(self, run: LayerRunner, width: LayerWidth, space: LayerSpace) -> LayerPlan:
        ad, layer = run.adapter, run.layer
        plan = LayerPlan()
        if width.remove_groups or width.remove_per_group:
            plan.kept_heads = prune_with_scores(ad, layer, width, self.head_scores(run), None).kept_heads
        if width.channels < space.channels:
            plan.kept_channels = prune_with_scores(ad, layer, width, None, self.channel_scores(run)).kept_channels
        return plan
