"""LLM-Pruner (Ma et al. 2023), its structural pruning step without the LoRA recovery
(recovery is a separate command).

Coupled groups: a query head (its q rows and o columns), a key/value group (its query heads plus
its k and v rows, removed together), an FFN channel (its gate and up rows and down column).
Importance is the element-wise first-order Taylor term (§3.2, "Element¹"): ``|w · ∂L/∂w|``
summed over every weight of the group, ``L`` the language-modelling loss on the calibration
windows (gradients accumulated one window at a time: batch 1 keeps memory at one sequence's
activations).

Which of the released code's ``--taylor`` choices this is (horseee/LLM-Pruner,
``LLMPruner/pruner/hf_llama_pruner.py::TaylorImportance``, ``--grouping_strategy sum``):

* ``param_first`` (the argparse default, and the LLaMA-3 recipe): ``salience = w · g``, then
  ``|salience|`` summed over each row/column, then summed over the group's layers. **This is the
  one we implement** (the paper's Element¹ with sum aggregation).
* ``vectorize`` (the paper's Vector-wise): ``|Σ w · g|`` per row/column of each layer, summed.
* ``param_second`` / ``param_mix``: second-order terms from a Fisher diagonal ``Σ g²/N``
  accumulated over per-sample backward passes (Element², and Element¹ − ½·Element²); not
  implemented (N extra backward passes; the README calls ``param_mix`` its default, the code's
  default is ``param_first``).

Differences from the released recipe that are deliberate: gradients come from the run's
calibration windows (the code uses 10 BookCorpus sequences of 64 tokens), and the ratio is
solved so the whole model loses ``--ratio`` of its parameters (the code's ``--pruning_ratio`` is
the share of groups removed in each pruned layer).

Layer range: like the paper's LLaMA recipe (``--block_*_layer_start 4 --block_*_layer_end 30`` of
32) only layers ``[4, L−2)`` are pruned, all with one ratio, solved so the *whole model* loses the
requested share of parameters. Models with fewer than 8 layers are pruned in every layer.
"""

from __future__ import annotations

import logging

import torch

from slimgpt.errors import ConfigError, NumericalError
from slimgpt.methods.base import GlobalMethod, PruneContext
from slimgpt.methods.scoring import prune_with_scores
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerWidth, model_kind, solve_widths, target_constraint

log = logging.getLogger(__name__)

Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per query head, per kv group, per channel


def taylor_scores(model, adapter, calib: torch.Tensor, layers: list[int], device: torch.device) -> dict[int, Scores]:
    """Group importances ``Σ |w · g|`` with ``g`` the gradient of the mean LM loss over ``calib``."""
    def linears(i: int) -> tuple:
        a, m = adapter.attention(adapter.layers[i]), adapter.mlp(adapter.layers[i])
        return a.q, a.k, a.v, a.o, m.gate, m.up, m.down

    targets = {i: linears(i) for i in layers}
    weights = [lin.weight for lins in targets.values() for lin in lins]
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        model.to(device)
        with torch.enable_grad():
            for ids in calib.split(1):
                ids = ids.to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / calib.shape[0]
                loss.backward()
        out = {}
        for i, (q, k, v, o, gate, up, down) in targets.items():
            imp = {name: (lin.weight.detach().float() * lin.weight.grad.float()).abs()
                   for name, lin in zip(("q", "k", "v", "o", "gate", "up", "down"), (q, k, v, o, gate, up, down))}
            if not all(torch.isfinite(t).all() for t in imp.values()):
                raise NumericalError(f"layer {i}: non-finite gradients; use --dtype float32 (or bfloat16)")
            geo = adapter.geometry(adapter.layers[i])
            d = geo.head_dim
            heads = imp["q"].sum(1).reshape(-1, d).sum(1) + imp["o"].sum(0).reshape(-1, d).sum(1)
            kv = (imp["k"].sum(1) + imp["v"].sum(1)).reshape(-1, d).sum(1)
            groups = heads.reshape(geo.num_kv_heads, -1).sum(1) + kv
            channels = imp["gate"].sum(1) + imp["up"].sum(1) + imp["down"].sum(0)
            out[i] = (heads, groups, channels)
        return out
    finally:
        for w in weights:
            w.grad = None
        for p, f in flags.items():
            p.requires_grad_(f)
        model.to(home)


class LLMPruner(GlobalMethod):
    name = "llm-pruner"

    def __init__(self, layer_start: int = 4, layer_end: int = -2) -> None:
        self.layer_start, self.layer_end = layer_start, layer_end

    def config(self) -> dict:
        return {"name": self.name, "layer_start": self.layer_start, "layer_end": self.layer_end,
                "importance": "taylor-element1"}

    def layer_range(self, n: int) -> range:
        if n < 8:
            log.info("llm-pruner: %d layers < 8, pruning every layer instead of [4, L-2)", n)
            return range(n)
        return range(*slice(self.layer_start, self.layer_end).indices(n))

    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        ad = ctx.adapter
        rng = self.layer_range(ad.num_layers)
        held = sum(ctx.spaces[i].params for i in rng)
        if not rng or ctx.cfg.ratio * ctx.dense_params > held:
            raise ConfigError(f"llm-pruner prunes only layers {rng.start}..{rng.stop - 1}, which hold "
                              f"{held / ctx.dense_params:.1%} of the parameters; lower --ratio below that")
        sub = solve_widths([ctx.spaces[i] for i in rng], ctx.dense_params, ctx.cfg.ratio, "uniform",
                           constraint=target_constraint(getattr(ctx.cfg, "target", "any"), *model_kind(ctx.model.config)))
        widths: dict[int, LayerWidth] = dict(zip(rng, sub))
        with ctx.timer("forward"):
            scores = taylor_scores(ctx.model, ad, ctx.calib, list(rng), ctx.device)
        plans = {}
        with ctx.timer("solver"):
            for i in rng:
                heads, groups, channels = scores[i]
                plans[i] = prune_with_scores(ad, ad.layers[i], widths[i], heads, channels, groups)
                plans[i].stats["ratio"] = widths[i].ratio
        return plans
