"""The layer-wise engine (ALGORITHMS.md §6): capture, prune, propagate, one layer at a time.

Layer 0's inputs are the embeddings of the calibration windows. For each layer: move it to the
compute device, let the method prune it (it runs blocks through a :class:`LayerRunner`), run the
pruned layer to produce the next layer's inputs (pruned-output propagation, the paper's choice;
``propagate="original"`` feeds the next layer the dense model's activations instead), move it
back. Only one layer's weights and the calibration activations are on the compute device.

Where a layer's weights come from and go to is a :class:`LayerStore`'s business: the default
leaves every layer in the model; :mod:`slimgpt.streaming` loads layer ``i`` from the checkpoint
files just before it is pruned and writes/frees it right after, so models larger than memory run
through this same loop and the same method code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from slimgpt import distributed
from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import NumericalError
from slimgpt.methods.base import LayerRunner, Method, Timer, embed_batches
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerSpace, LayerWidth

log = logging.getLogger(__name__)


class LayerStore:
    """Where decoder layers (and the activations between them) live during a layer-wise run.

    This default keeps everything in memory and does nothing; subclasses load a layer's weights
    on :meth:`acquire`, cut/save/free it on :meth:`release`, and may move activations to disk in
    :meth:`keep`.
    """

    def inputs(self, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
               offload: torch.device) -> list[torch.Tensor]:
        """Layer 0's inputs (a streaming store must materialise the embedding first)."""
        return embed_batches(adapter, calib, batch_size, offload)

    def acquire(self, index: int) -> None:
        """Make ``adapter.layers[index]`` hold real weights (it is pruned next)."""

    def release(self, index: int, plan: LayerPlan) -> None:
        """Layer ``index`` is finished: its weights are edited in place and ``plan`` is final."""

    def keep(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index``'s inputs as they should be held until it runs (default: as given)."""
        return hidden


@dataclass
class DriverResult:
    plans: dict[int, LayerPlan]
    seconds: dict[str, float] = field(default_factory=dict)


def layer_spaces(adapter: ModelAdapter) -> list[LayerSpace]:
    """What each layer can give up, read off its current weights."""
    out = []
    for layer in adapter.layers:
        geo = adapter.geometry(layer)
        per_q, per_kv = adapter.attention_params_per_head(layer)
        out.append(
            LayerSpace(
                geo.num_heads, geo.num_kv_heads, adapter.intermediate_size(layer),
                per_q, per_kv, adapter.mlp_params_per_channel(layer),
            )
        )
    return out


def run_layerwise(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    method: Method,
    widths: list[LayerWidth],
    spaces: list[LayerSpace],
    device: torch.device,
    batch_size: int = 8,
    propagate: str = "pruned",
    offload: torch.device | None = None,
    start_layer: int = 0,
    inputs: list[torch.Tensor] | None = None,
    on_layer_done: Callable[[int, LayerPlan, list[torch.Tensor]], None] | None = None,
    progress: bool = True,
    store: LayerStore | None = None,
) -> DriverResult:
    """Prune every layer in order; returns the per-layer plans and time per bucket.

    ``start_layer``/``inputs`` resume a run from a checkpoint; ``on_layer_done`` is called with
    each finished layer's plan and the next layer's inputs (to write checkpoints), after
    ``store.release``. ``store`` decides where layer weights live (default: in the model).

    Under ``torchrun`` each rank embeds and propagates only its share of the windows
    (:func:`slimgpt.distributed.shard`; resumed ``inputs`` are that share already); the method's
    Hessians are reduced and its solves shared by the :class:`LayerRunner`, so every rank holds the
    same pruned layer before the next one's activations are computed.
    """
    if propagate not in ("pruned", "original"):
        raise ValueError("propagate must be 'pruned' or 'original'")
    offload = offload or torch.device("cpu")
    store = store or LayerStore()
    torch.set_flush_denormal(True)  # fp32 solves on CPU can slow 50x on denormals (measured here)
    timer = Timer(device)
    model_dtype = next(adapter.model.parameters()).dtype
    with timer("forward"):
        hidden = inputs if inputs is not None else store.inputs(adapter, distributed.shard(calib, batch_size),
                                                                batch_size, offload)
        hidden = store.keep(start_layer, hidden)
    ctx = adapter.context(calib.shape[1], device, model_dtype)
    plans: dict[int, LayerPlan] = {}
    bar = tqdm(range(start_layer, adapter.num_layers), desc=f"{method.name}: layers", disable=not progress)
    for i in bar:
        store.acquire(i)
        layer = adapter.layers[i]
        home = next(layer.parameters()).device
        with timer("offload"):
            layer.to(device)
        run = LayerRunner(i, layer, adapter, hidden, ctx, device, timer)
        dense_out = None
        if propagate == "original":
            dense = run.outputs()
            with timer("offload"):  # moving activations off the compute device, a cost of its own on a GPU
                dense_out = [o.to(offload) for o in dense]
            del dense
        try:
            plan = method.prune_layer(run, widths[i], spaces[i])
        except NumericalError as e:  # solvers do not know the layer; the user needs it
            if f"layer {i} " in f"{e} ":
                raise
            raise NumericalError(f"layer {i}: {e}") from e
        geo = adapter.geometry(layer)
        plan.stats.update(
            heads=len(plan.kept_heads) if plan.kept_heads is not None else geo.num_heads,
            kv_heads=len(plan.kept_kv_heads(geo.num_heads, geo.num_kv_heads) or [])
            if plan.kept_heads is not None
            else geo.num_kv_heads,
            channels=len(plan.kept_channels) if plan.kept_channels is not None else spaces[i].channels,
            ratio=widths[i].ratio,
        )
        out = run.outputs()
        with timer("offload"):
            out = [o.to(offload) for o in out]
        hidden = dense_out if dense_out is not None else out
        del run
        with timer("offload"):
            layer.to(home)
        plans[i] = plan
        bar.set_postfix(heads=plan.stats["heads"], channels=plan.stats["channels"])
        store.release(i, plan)
        if i + 1 < adapter.num_layers:
            hidden = store.keep(i + 1, hidden)
        if on_layer_done is not None:
            on_layer_done(i, plan, hidden)
    return DriverResult(plans, dict(timer.seconds))
