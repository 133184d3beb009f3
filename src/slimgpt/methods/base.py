"""The interface every layer-wise method implements, and what the driver hands it.

The driver owns capture, propagation and offloading; a method owns the choice. It gets a
:class:`LayerRunner` for the current layer (inputs already on the compute device's side, helpers
to collect Hessians and activations) and the layer's solved :class:`~slimgpt.schedule.LayerWidth`,
edits the layer's weights in place (pruned columns zeroed, the rest compensated) and returns a
:class:`~slimgpt.plan.LayerPlan` that surgery turns into smaller tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from slimgpt.arch.base import ModelAdapter
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner, Timer
from slimgpt.schedule import LayerSpace, LayerWidth


class Method(ABC):
    """A layer-wise structured pruning method."""

    name: str = "method"
    # Splits its calibration across torchrun processes: every statistic it sums over tokens is
    # reduced (LayerRunner's Hessians) and its solve goes through LayerRunner.solve.
    distributed: bool = False
    # Reads LayerRunner.attention_statistics / mlp_statistics and solves toward their G, so the
    # driver may give it a dense stream (--compensate asymmetric|drift).
    compensates: bool = False

    @abstractmethod
    def prune_layer(self, run: LayerRunner, width: LayerWidth, space: LayerSpace) -> LayerPlan:
        """Prune ``run.layer`` in place to ``width``; return what was kept."""

    def config(self) -> dict:
        """The method's knobs, recorded beside the saved model."""
        return {"name": self.name}


class PruneContext:
    """Everything a whole-model method needs: the model, its adapter, calibration windows,
    the resolved config, the compute device, the per-layer spaces and a timer."""

    def __init__(self, model, adapter: ModelAdapter, calib: torch.Tensor, cfg, device: torch.device,
                 spaces: list[LayerSpace], dense_params: int, timer: Timer, progress: bool = True) -> None:
        self.model, self.adapter, self.calib, self.cfg = model, adapter, calib, cfg
        self.device, self.spaces, self.dense_params = device, spaces, dense_params
        self.timer, self.progress = timer, progress
        self.journal: Any = None  # a methods.blockpruner.SearchJournal when the run can be resumed
        # The pipeline's layer-wise driver, for methods that run a layer-wise pass inside their
        # plan (the hybrid): (method, widths, spaces) -> plans; its time adds to ``timer``.
        self.run_layers: Callable[[Method, list[LayerWidth], list[LayerSpace]], dict[int, LayerPlan]] | None = None


class GlobalMethod(ABC):
    """A method that decides over the whole model at once (block search, gradients, global
    rankings) instead of layer by layer. It may edit weights in place (e.g. bias compensation)
    and returns the same per-layer :class:`LayerPlan` as layer-wise methods, so surgery, saving
    and evaluation are shared."""

    name: str = "global"
    distributed: bool = False  # splits its calibration work across torchrun processes

    @abstractmethod
    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        """Prune ``ctx.model`` to ``ctx.cfg.ratio`` of all parameters; return what was kept."""

    def config(self) -> dict:
        return {"name": self.name}
