"""Per-layer pruning ratios and the solve to a whole-model parameter target (paper §4.3, Eq. 6).

The user's ``--ratio`` is the share of *all* parameters removed (the paper's convention:
LLaMA-7B at 20 % → 5.4B). Layer ``i`` of ``n`` gets ratio ``r_i`` from a schedule; each layer's
heads and channels are rounded to what the architecture allows (whole heads, equal heads per
key/value group), and the free end of the schedule is solved by bisection so the parameters
actually removed, after rounding, hit the target. A last pass nudges FFN widths so the total
lands within one channel of the target.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from slimgpt.errors import ConfigError

log = logging.getLogger(__name__)

SCHEDULES = ("auto", "log", "linear", "uniform", "log-decrease", "linear-decrease", "search")
# auto: slimgpt.allocation (chosen from calibration statistics); search: methods/searched.py


@dataclass(frozen=True)
class LayerSpace:
    """What one layer can give up: its geometry and the parameter cost of each unit."""

    num_heads: int
    num_kv_heads: int
    channels: int
    per_q_head: int  # q rows + o columns (+ q bias) of one query head
    per_kv_head: int  # k and v rows (+ biases) of one key/value head
    per_channel: int  # gate/up rows + down column of one channel

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def params(self) -> int:
        return self.num_heads * self.per_q_head + self.num_kv_heads * self.per_kv_head + self.channels * self.per_channel


@dataclass(frozen=True)
class LayerWidth:
    """A layer's solved shape: remove ``remove_groups`` whole key/value groups, then
    ``remove_per_group`` query heads from each remaining group; keep ``channels`` channels."""

    remove_groups: int
    remove_per_group: int
    channels: int
    ratio: float  # the schedule's ratio for this layer, before rounding

    def heads(self, s: LayerSpace) -> int:
        return (s.num_kv_heads - self.remove_groups) * (s.n_rep - self.remove_per_group)

    def kv_heads(self, s: LayerSpace) -> int:
        return s.num_kv_heads - self.remove_groups if self.heads(s) else 0

    def params(self, s: LayerSpace) -> int:
        return self.heads(s) * s.per_q_head + self.kv_heads(s) * s.per_kv_head + self.channels * s.per_channel


def schedule_ratios(kind: str, n: int, first: float, last: float) -> list[float]:
    """Ratios from ``first`` (layer 0) to ``last`` (layer n-1); ``*-decrease`` mirror the curve."""
    if n == 1:
        return [last]
    if kind == "uniform":
        return [last] * n
    base = kind.removesuffix("-decrease")
    if base == "log":
        curve = [math.log(i + 1) / math.log(n) for i in range(n)]
    elif base == "linear":
        curve = [i / (n - 1) for i in range(n)]
    else:
        raise ConfigError(f"unknown schedule '{kind}'; use one of {', '.join(SCHEDULES)} or a JSON file")
    r = [first + (last - first) * c for c in curve]
    return r[::-1] if kind.endswith("-decrease") else r


def round_layer(s: LayerSpace, ratio: float, attn_scale: float | None = None) -> LayerWidth:
    """Round a layer's ratio to allowed shapes.

    ``attn_scale=None`` (the paper's schedules): attention to the (groups, per-group) combination
    whose parameter count is closest to ``(1 - ratio)`` of the attention parameters (ties: fewer
    whole groups removed), FFN to the nearest whole channel of ``(1 - ratio)``.

    ``attn_scale=a`` (the candidates of ``--schedule auto``): attention aims at ``a · ratio`` of its
    parameters and the FFN gives what makes the *layer* lose ``ratio`` of its parameters, so the
    head rounding is absorbed in the same layer (``a = 0``: FFN channels only)."""
    ratio = min(max(ratio, 0.0), 1.0)
    attn_ratio = ratio if attn_scale is None else min(attn_scale * ratio, 1.0)
    g, r = _nearest_attention(s, attn_ratio)
    if attn_scale is None:
        return LayerWidth(g, r, round((1 - ratio) * s.channels), ratio)
    attn_removed = s.params - s.channels * s.per_channel - LayerWidth(g, r, 0, ratio).params(s)
    ffn_removed = ratio * s.params - attn_removed
    channels = min(max(round(s.channels - ffn_removed / s.per_channel), 0), s.channels)
    return LayerWidth(g, r, channels, ratio)


def _nearest_attention(s: LayerSpace, ratio: float) -> tuple[int, int]:
    """``(remove_groups, remove_per_group)`` keeping the nearest to ``1 - ratio`` of the attention
    parameters (ties: fewer whole groups removed); an empty attention is one shape."""
    attn_params = s.num_heads * s.per_q_head + s.num_kv_heads * s.per_kv_head
    want = (1 - ratio) * attn_params
    best = None
    for g in range(s.num_kv_heads + 1):
        for r in range(s.n_rep + 1):
            w = LayerWidth(g, r, 0, ratio)
            cost = abs(w.heads(s) * s.per_q_head + w.kv_heads(s) * s.per_kv_head - want)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, g, r)
    assert best is not None
    _, g, r = best
    if (s.num_kv_heads - g) * (s.n_rep - r) == 0:
        g, r = s.num_kv_heads, 0  # an empty attention is one shape, however reached
    return g, r


def load_schedule_file(path: str | Path, n: int) -> list[float]:
    """A user-given list of ``n`` per-layer ratios (JSON list, or one number per line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"schedule file {p} does not exist")
    text = p.read_text().strip()
    try:
        values = json.loads(text) if text.startswith("[") else [float(x) for x in text.split()]
        values = [float(v) for v in values]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"schedule file {p} is not a list of numbers ({e})") from None
    if len(values) != n:
        raise ConfigError(f"schedule file {p} has {len(values)} ratios but the model has {n} layers")
    if any(not 0 <= v <= 1 for v in values):
        raise ConfigError(f"schedule file {p}: every ratio must be within [0, 1]")
    return values


def removed_params(spaces: list[LayerSpace], widths: list[LayerWidth]) -> int:
    return sum(s.params - w.params(s) for s, w in zip(spaces, widths))


def solve_widths(
    spaces: list[LayerSpace],
    total_params: int,
    target_ratio: float,
    schedule: str = "log",
    first_ratio: float | None = None,
    attn_scale: float | None = None,
) -> list[LayerWidth]:
    """Per-layer widths that remove ``target_ratio`` of ``total_params`` (all parameters).

    ``schedule`` may be a file of per-layer ratios; those are used as given and the target is
    ignored (the achieved ratio is reported by the caller). ``attn_scale`` splits each layer's
    ratio between attention and FFN (:func:`round_layer`); ``None`` is the paper's equal split."""
    n = len(spaces)
    if schedule in ("search", "auto"):
        raise ConfigError(f"--schedule {schedule} is chosen from calibration statistics (--method slimgpt), "
                          "not solved here")
    if schedule not in SCHEDULES:
        return [round_layer(s, r) for s, r in zip(spaces, load_schedule_file(schedule, n))]
    if not 0 < target_ratio < 1:
        raise ConfigError(f"--ratio must be in (0, 1), got {target_ratio}")
    prunable = sum(s.params for s in spaces)
    target = target_ratio * total_params
    if target > prunable:
        raise ConfigError(
            f"--ratio {target_ratio} asks to remove {target / 1e6:.1f}M parameters but only "
            f"{prunable / 1e6:.1f}M ({prunable / total_params:.1%}) sit in attention and MLP blocks; lower --ratio"
        )

    mean_layer_ratio = target / prunable
    if schedule == "uniform":
        first = 0.0  # unused
    elif first_ratio is None:
        first = mean_layer_ratio / 3.2  # the authors' 7B example: r0 = 0.0625 for 20 % (ALGORITHMS.md §5)
    else:
        first = first_ratio
    if not 0 <= first <= 1:
        raise ConfigError(f"--first-ratio must be within [0, 1], got {first}")

    def widths_for(first: float, last: float) -> list[LayerWidth]:
        return [round_layer(s, r, attn_scale) for s, r in zip(spaces, schedule_ratios(schedule, n, first, last))]

    def bisect(make: Callable[[float], list[LayerWidth]], lo: float, hi: float) -> list[LayerWidth]:
        """The widths, monotone in the free parameter, whose removed count is nearest the target."""
        for _ in range(60):
            mid = (lo + hi) / 2
            if removed_params(spaces, make(mid)) < target:
                lo = mid
            else:
                hi = mid
        return min((make(lo), make(hi)), key=lambda w: abs(removed_params(spaces, w) - target))

    # Solve the free (deep) end within [0, 1]. If even a deep end of 1 is not enough (steep
    # schedules at high targets, e.g. linear at 50 %), keep it at 1 and raise the first ratio
    # instead, rather than letting the curve clip at 1 and delete whole layers.
    if removed_params(spaces, widths_for(first, 1.0)) >= target:
        best = bisect(lambda last: widths_for(first, last), 0.0, 1.0)
    else:
        if removed_params(spaces, widths_for(1.0, 1.0)) < target:
            raise ConfigError(f"--ratio {target_ratio} cannot be reached; lower --ratio")
        log.info("%s schedule: raising the first ratio above %.3f to reach the target", schedule, first)
        best = bisect(lambda f: widths_for(f, 1.0), first, 1.0)
    return _fine_tune(best, spaces, target)


def _fine_tune(widths: list[LayerWidth], spaces: list[LayerSpace], target: float) -> list[LayerWidth]:
    """Absorb the rounding residual in FFN widths, deepest layers first, so the total lands
    within half a channel of the target; the head rounding stays as solved."""
    widths = list(widths)
    for i in reversed(range(len(widths))):
        s, w = spaces[i], widths[i]
        k = round((target - removed_params(spaces, widths)) / s.per_channel)  # >0: remove more
        if k == 0:
            break
        widths[i] = replace(w, channels=min(max(w.channels - k, 0), s.channels))
    return widths
