"""Magnitude pruning: a structure's importance is the L2 norm of its weights (no data, no
compensation). The data-free baseline of the structured-pruning papers (LLM-Pruner Table 1's
"L2"), with SlimGPT's per-layer widths so only the choice of structures differs."""

from __future__ import annotations

import torch
from torch import nn

from slimgpt.arch.base import ModelAdapter
from slimgpt.methods.base import Method
from slimgpt.methods.scoring import prune_with_scores
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner
from slimgpt.schedule import LayerSpace, LayerWidth


@torch.no_grad()
def magnitude_scores(adapter: ModelAdapter, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per query head, per key/value group, per channel) L2 norms: a head's q rows and o
    columns; a group's heads plus its k and v rows (all of which go with it); a channel's
    gate and up rows and down column."""
    lin, mlp, geo = adapter.attention(layer), adapter.mlp(layer), adapter.geometry(layer)
    d = geo.head_dim
    f32 = torch.float32
    q_sq = lin.q.weight.to(f32).pow(2).sum(1).reshape(-1, d).sum(1)
    o_sq = lin.o.weight.to(f32).pow(2).sum(0).reshape(-1, d).sum(1)
    kv_sq = (lin.k.weight.to(f32).pow(2).sum(1) + lin.v.weight.to(f32).pow(2).sum(1)).reshape(-1, d).sum(1)
    head_sq = q_sq + o_sq
    group_sq = head_sq.reshape(geo.num_kv_heads, -1).sum(1) + kv_sq
    ch_sq = mlp.gate.weight.to(f32).pow(2).sum(1) + mlp.up.weight.to(f32).pow(2).sum(1) \
        + mlp.down.weight.to(f32).pow(2).sum(0)
    return head_sq.sqrt(), group_sq.sqrt(), ch_sq.sqrt()


class Magnitude(Method):
    name = "magnitude"

    def prune_layer(self, run: LayerRunner, width: LayerWidth, space: LayerSpace) -> LayerPlan:
        with run.timer("solver"):
            heads, groups, channels = magnitude_scores(run.adapter, run.layer)
            return prune_with_scores(run.adapter, run.layer, width, heads, channels, groups)
