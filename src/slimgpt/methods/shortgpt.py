"""ShortGPT (Men et al. 2024): remove whole decoder layers with the lowest Block Influence.

``BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)]``: one minus the cosine similarity between layer ``i``'s
input and output hidden state, averaged over all calibration tokens (paper Eq. 1). A layer that
barely turns the residual stream changes the model least when skipped. The scores come from one
forward pass of the dense model and the ``n`` lowest-BI layers go at once (no re-scoring: that is
the paper's method and what separates it from BlockPruner's iterative search).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError
from slimgpt.methods.base import PruneContext
from slimgpt.methods.blockpruner import (
    DepthMethod,
    block_params,
    removal_plans,
    target_from_config,
)
from slimgpt.plan import LayerPlan
from slimgpt.twin import on_device

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(adapter: ModelAdapter, calib: torch.Tensor, device: torch.device, batch_size: int = 8) -> list[float]:
    """Per layer, ``1 - mean cosine(input, output)`` over every calibration token (float64 sums)."""
    dtype = next(adapter.model.parameters()).dtype
    ctx = adapter.context(calib.shape[1], device, dtype)
    sums = torch.zeros(adapter.num_layers, dtype=torch.float64)
    count = 0
    for ids in calib.split(batch_size):
        h = adapter.embed(ids.to(device))
        for i, layer in enumerate(adapter.layers):
            out = adapter.mlp_block(layer, adapter.attention_block(layer, h, ctx))
            sums[i] += F.cosine_similarity(h.float(), out.float(), dim=-1).double().sum().cpu()
            h = out
        count += ids.numel()
    return (1 - sums / count).tolist()


def layers_for_target(order: list[int], sizes: list[int], target: float) -> int:
    """How many layers, taken in ``order``, remove the parameter count nearest ``target``."""
    best, best_err, removed = 0, abs(target), 0
    for n, i in enumerate(order, start=1):
        removed += sizes[i]
        if abs(removed - target) < best_err:
            best, best_err = n, abs(removed - target)
        if removed >= target:
            break
    return best


class ShortGPT(DepthMethod):
    """Layer removal by Block Influence."""

    name = "shortgpt"
    depth_unit = "layer"  # for `slimgpt compare`: the coarsest granularity, run first

    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        n_blocks, target = target_from_config(ctx, unit=2)
        L = ctx.adapter.num_layers
        sizes = [block_params(ctx.spaces, 2 * i) + block_params(ctx.spaces, 2 * i + 1) for i in range(L)]
        t0 = time.perf_counter()
        with on_device(ctx.model, ctx.device), ctx.timer("forward"):
            bi = block_influence(ctx.adapter, ctx.calib, ctx.device, ctx.cfg.batch_size)
        order = sorted(range(L), key=lambda i: (bi[i], i))
        if n_blocks is not None:
            n = n_blocks // 2
        else:
            if target >= sum(sizes):
                raise ConfigError(f"--ratio {ctx.cfg.ratio} removes more than all decoder layers hold; lower --ratio")
            n = layers_for_target(order, sizes, target)
        if not 0 < n < L:
            raise ConfigError(f"shortgpt would remove {n} of {L} layers; choose a --ratio or --blocks that removes 1..{L - 1}")
        drop = sorted(order[:n])
        removed = sum(sizes[i] for i in drop)
        self.result = {
            "block_influence": [round(x, 6) for x in bi],
            "removed_layers": drop,
            "params_removed": removed,
            "removed_ratio": removed / ctx.dense_params,
            "search_s": time.perf_counter() - t0,
        }
        log.info("shortgpt: removing layers %s (BI %s)", drop, ", ".join(f"{bi[i]:.4f}" for i in drop))
        return removal_plans(ctx.adapter, [b for i in drop for b in (2 * i, 2 * i + 1)])
