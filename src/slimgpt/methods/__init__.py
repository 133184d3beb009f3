"""Pruning methods behind one interface.

``METHODS`` maps a ``--method`` name to a factory ``(PruneConfig) -> Method | GlobalMethod``.
Layer-wise methods (:class:`~slimgpt.methods.base.Method`) get per-layer widths from the schedule
and run inside the shared driver; whole-model methods (:class:`~slimgpt.methods.base.GlobalMethod`)
return plans directly. Either way the plans go through the same surgery and save path.
A new method is a module here plus one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from slimgpt.methods.base import GlobalMethod, Method


def _slimgpt(cfg: Any) -> Method | GlobalMethod:
    from slimgpt.methods.slimgpt import SlimGPT

    if cfg.schedule == "search":  # the searched allocation: a whole-model method around SlimGPT
        return import_module("slimgpt.methods.searched").SearchedSlimGPT.from_config(cfg)
    groups: int | str = cfg.ffn_groups if cfg.ffn_groups == "dynamic" else int(cfg.ffn_groups)
    shrink = getattr(cfg, "shrink", "heldout")
    return SlimGPT(cfg.head_score, groups, cfg.min_group, cfg.max_group, cfg.damp,
                   shrink=None if shrink == "heldout" else float(shrink))


METHODS: dict[str, Callable[[Any], Method | GlobalMethod]] = {
    "slimgpt": _slimgpt,
    "blockpruner": lambda cfg: import_module("slimgpt.methods.blockpruner").BlockPruner.from_config(cfg),
    "shortgpt": lambda cfg: import_module("slimgpt.methods.shortgpt").ShortGPT.from_config(cfg),
    "slimgpt+blockpruner": lambda cfg: import_module("slimgpt.methods.hybrid").SlimGPTBlockPruner.from_config(cfg),
    "magnitude": lambda cfg: import_module("slimgpt.methods.magnitude").Magnitude(),
    "wanda-sp": lambda cfg: import_module("slimgpt.methods.wanda_sp").WandaSP(),
    "flap": lambda cfg: import_module("slimgpt.methods.flap").FLAP(),
    "llm-pruner": lambda cfg: import_module("slimgpt.methods.llm_pruner").LLMPruner(),
}


def make_method(cfg: Any) -> Method | GlobalMethod:
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "GlobalMethod", "Method", "make_method"]
