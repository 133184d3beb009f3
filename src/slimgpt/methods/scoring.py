"""What the score-and-remove baselines (magnitude, Wanda-sp, FLAP, LLM-Pruner) share.

They differ only in how a head or a channel is scored and in how many of them each layer keeps.
Per-column activation statistics, picking heads under the grouped-query constraint, zeroing what
goes (so the full-size model already computes what surgery's smaller one will) and the dense
statistics pass are the same for all of them, so they live here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slimgpt.arch.base import ModelAdapter
from slimgpt.methods.base import PruneContext
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner, embed_batches
from slimgpt.schedule import LayerSpace, LayerWidth, round_layer


class ColumnStats:
    """Running per-input-column sums over calibration tokens, in float64: the variance as
    ``(Σx² − n·mean²)/(n−1)`` cancels badly in half precision."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.n = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """Sample (unbiased) variance of each column."""
        return ((self.sumsq - self.n * self.mean.pow(2)) / max(self.n - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """``||x_j||₂`` over all calibration tokens."""
        return self.sumsq.sqrt()


def attention_input_stats(run: LayerRunner) -> ColumnStats:
    """Statistics of o_proj's input (the concatenated head outputs) over the layer's inputs."""
    o = run.adapter.attention(run.layer).o
    stats = ColumnStats(o.in_features, run.device)
    handle = o.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    try:
        with torch.no_grad(), run.timer("forward"):
            for x in run.batches():
                run.adapter.attention_block(run.layer, x, run.ctx)
    finally:
        handle.remove()
    return stats


def mlp_input_stats(run: LayerRunner) -> ColumnStats:
    """Statistics of down_proj's input after the layer's current (possibly pruned) attention."""
    stats = ColumnStats(run.adapter.intermediate_size(run.layer), run.device)
    run.attention_outputs()  # (re)computed and timed here, so the bucket below does not count it twice
    with run.timer("forward"):
        run.map_mlp_hidden(stats.add)
    return stats


def dense_pass(ctx: PruneContext, visit: Callable[[LayerRunner], None]) -> None:
    """Run the calibration windows through the *unpruned* model layer by layer, calling
    ``visit`` on each layer's runner before its outputs become the next layer's inputs (one
    layer on the compute device at a time, as in the layer-wise driver)."""
    adapter = ctx.adapter
    offload = torch.device("cpu")
    dtype = next(adapter.model.parameters()).dtype
    with ctx.timer("forward"):
        hidden = embed_batches(adapter, ctx.calib, ctx.cfg.batch_size, offload)
    lctx = adapter.context(ctx.calib.shape[1], ctx.device, dtype)
    for i in tqdm(range(adapter.num_layers), desc="statistics: layers", disable=not ctx.progress):
        layer = adapter.layers[i]
        home = next(layer.parameters()).device
        layer.to(ctx.device)
        run = LayerRunner(i, layer, adapter, hidden, lctx, ctx.device, ctx.timer)
        visit(run)
        hidden = [o.to(offload) for o in run.outputs()]
        layer.to(home)


# ---- choosing what goes ------------------------------------------------------------------------


def select_heads(head_scores: torch.Tensor, num_kv_heads: int, remove_groups: int, remove_per_group: int,
                 group_scores: torch.Tensor | None = None) -> list[int] | None:
    """Kept query heads (sorted) after dropping the ``remove_groups`` lowest-scoring key/value
    groups (``group_scores``, default the sum of their heads' scores), then the
    ``remove_per_group`` lowest-scoring query heads of every remaining group: the only shapes
    stock grouped-query attention can run. ``None`` when nothing goes; ties keep lower indices."""
    if remove_groups == 0 and remove_per_group == 0:
        return None
    n_rep = head_scores.numel() // num_kv_heads
    per_group = head_scores.reshape(num_kv_heads, n_rep)
    g = per_group.sum(1) if group_scores is None else group_scores
    keep_groups = torch.sort(torch.argsort(g, stable=True)[remove_groups:]).values.tolist()
    kept = []
    for grp in keep_groups:
        kept += [grp * n_rep + int(j) for j in torch.argsort(per_group[grp], stable=True)[remove_per_group:]]
    return sorted(kept)


def select_channels(scores: torch.Tensor, keep: int) -> list[int] | None:
    """The ``keep`` highest-scoring channels (sorted); ``None`` when all stay."""
    if keep >= scores.numel():
        return None
    return sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())


def gqa_width(space: LayerSpace, keep_heads: int, keep_channels: int) -> LayerWidth:
    """Round a free query-head count to the nearest valid grouped-query shape (by attention
    parameters, as the schedule does: :func:`~slimgpt.schedule.round_layer`)."""
    w = round_layer(space, 1 - keep_heads / space.num_heads)
    return LayerWidth(w.remove_groups, w.remove_per_group, keep_channels, 1 - keep_heads / space.num_heads)


def head_columns(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def removed_columns(kept: list[int] | None, size: int, unit: int = 1) -> list[int]:
    """Input columns of units (heads of ``unit`` columns, or channels) that are not kept."""
    if kept is None:
        return []
    keep = set(kept)
    return [c for c in range(size) if c // unit not in keep]


@torch.no_grad()
def zero_removed(adapter: ModelAdapter, layer: nn.Module, plan: LayerPlan) -> None:
    """Zero the o_proj columns of removed heads and down_proj columns of removed channels; the
    full-size model then already computes what the shrunk one will."""
    o, down = adapter.attention(layer).o, adapter.mlp(layer).down
    cols = removed_columns(plan.kept_heads, o.in_features, adapter.geometry(layer).head_dim)
    if cols:
        o.weight[:, cols] = 0
    cols = removed_columns(plan.kept_channels, down.in_features)
    if cols:
        down.weight[:, cols] = 0


def prune_with_scores(adapter: ModelAdapter, layer: nn.Module, width: LayerWidth,
                      head_scores: torch.Tensor | None, channel_scores: torch.Tensor | None,
                      group_scores: torch.Tensor | None = None) -> LayerPlan:
    """Keep the best heads/channels of ``layer`` at ``width``, zero the rest (no compensation)."""
    plan = LayerPlan()
    if head_scores is not None:
        geo = adapter.geometry(layer)
        plan.kept_heads = select_heads(head_scores, geo.num_kv_heads, width.remove_groups,
                                       width.remove_per_group, group_scores)
    if channel_scores is not None:
        plan.kept_channels = select_channels(channel_scores, width.channels)
    zero_removed(adapter, layer, plan)
    return plan
