"""The searched allocation's command-line flags and config checks (kept out of cli.py/config.py,
which call :func:`add_allocation_args`, :func:`allocation_kwargs` and :func:`validate_allocation`)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from slimgpt.errors import ConfigError

# PruneConfig field -> (default, CLI help)
FIELDS: dict[str, tuple[Any, str]] = {
    "search_budget": ("25m", "--schedule search: time budget for the level database and the search, e.g. 1500, "
                             "90s, 25m, 1h (default 25m); the search stops between generations"),
    "search_generations": (1000, "--schedule search: at most N generations (the result depends on the seed and "
                                 "the generations run, recorded with it)"),
    "search_offspring": (16, "--schedule search: children per generation"),
    "search_tokens": ("512,2048,8192", "--schedule search: calibration tokens per selection stage (the first "
                                       "whole windows of the calibration set; a stage shorter than --seqlen "
                                       "scores that prefix of window 0)"),
    "search_survivors": ("4,1", "--schedule search: children kept after each stage but the last"),
    "search_levels": (10, "--schedule search: levels per attention and FFN block, evenly spaced in kept "
                          "parameters (10: 100 %%, 90 %%, ..., 0 %%; the database holds about (N-1)/2 copies "
                          "of every o_proj and down_proj)"),
    "search_ffn_step": (0, "--schedule search: the earlier full ladders instead of --search-levels: every GQA "
                           "shape and every N FFN channels (64 gave the published SmolLM2 numbers; the "
                           "database grows as F^2/N per layer). 0 (default): off"),
    "search_final": ("rerun", "--schedule search: rerun (sequential SlimGPT at the found widths, the "
                              "paper's propagated inputs) | stitch (the database's dense-input variants)"),
}


def parse_seconds(text: str | float | int) -> float:
    """``1500`` / ``90s`` / ``25m`` / ``1.5h`` → seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--search-budget must be seconds or a number with s/m/h, e.g. 25m; got '{text}'")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated integers; got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"--{name} must be positive integers; got '{text}'")
    return values


def add_allocation_args(p: argparse.ArgumentParser) -> None:
    """``--search-*`` flags of ``--schedule search`` (one block in ``add_prune_args``)."""
    for name, (default, text) in FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=text)


def allocation_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The PruneConfig fields from parsed args (defaults where a subcommand lacks the flags)."""
    return {name: getattr(a, name, default) for name, (default, _) in FIELDS.items()}


def validate_allocation(cfg: Any) -> None:
    """Cheap checks before a model is loaded."""
    if cfg.schedule == "search" and cfg.method != "slimgpt":
        raise ConfigError(f"--schedule search is SlimGPT's searched allocation; it needs --method slimgpt, not {cfg.method}")
    parse_seconds(cfg.search_budget)
    stages = int_list(cfg.search_tokens, "search-tokens")
    survivors = int_list(cfg.search_survivors, "search-survivors")
    if len(survivors) != len(stages) - 1:
        raise ConfigError("--search-survivors needs one count per --search-tokens stage but the last")
    for name in ("search_generations", "search_offspring"):
        if int(getattr(cfg, name)) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if int(cfg.search_levels) < 2:
        raise ConfigError(f"--search-levels must be at least 2 (dense, removed and what lies between); got {cfg.search_levels}")
    if int(cfg.search_ffn_step) < 0:
        raise ConfigError(f"--search-ffn-step must be positive (or 0: use --search-levels); got {cfg.search_ffn_step}")
    if cfg.search_final not in ("rerun", "stitch"):
        raise ConfigError(f"--search-final must be rerun or stitch; got '{cfg.search_final}'")
