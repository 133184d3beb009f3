"""Per-layer pruning ratios and the solve to a whole-model parameter target (paper §4.3, Eq. 6).

The user's ``--ratio`` is the share of *all* parameters removed (the paper's convention:
LLaMA-7B at 20 % → 5.4B). Layer ``i`` of ``n`` gets ratio ``r_i`` from a schedule; each layer's
heads and channels are rounded to what the architecture allows (whole heads, equal heads per
key/value group), and the free end of the schedule is solved by bisection so the parameters
actually removed, after rounding, hit the target. A last pass nudges FFN widths so the total
lands within one channel of the target.

**Serving targets.** ``--target vllm|sglang`` hands every function here one
:class:`~slimgpt.serving.Constraint` (:func:`target_constraint`): the rounding then only picks
shapes the engine serves (:func:`attention_allowed`: vLLM keeps at least one key/value group of
every attention, SGLang's heads stay unpruned; FFN widths in multiples of ``ffn_unit``) and the
solve and its last pass work in those units, so the total lands within half a unit (one channel,
or 256 channels for SGLang) of the target. ``None`` (``--target any``) is today's arithmetic.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError
from slimgpt.serving import FAMILIES, ROUTES, Constraint

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


def target_constraint(target: str, family: str | None = None, sliding: bool = False,
                      prefer: str | None = None) -> Constraint | None:
    """The shape rules a prune for ``--target`` allocates inside (``None`` for ``any``): the first
    of the target's routes that can express the model (``family``, ``sliding``-window layers, as
    :func:`slimgpt.serving.route_for` reads them), the ``prefer``-red route first. Schedules take
    vLLM's first route (transformers: per-layer heads, every attention kept) and SGLang's deci
    route; whole-block methods prefer deci (blocks removed whole, one head count)."""
    if target == "any":
        return None
    if target not in ROUTES:
        raise ConfigError(f"--target must be any, {' or '.join(ROUTES)}; got '{target}'")
    reasons = []
    for c in sorted(ROUTES[target], key=lambda c: c.route != prefer):  # stable: the target's order otherwise
        why = c.refuses_model(family, sliding)
        if why is None:
            return c
        reasons.append(f"{c.route} route: {why}")
    raise ConfigError(f"--target {target} cannot serve this model ({'; '.join(reasons)}); drop --target")


def model_kind(config: Any) -> tuple[str | None, bool]:
    """``(family, sliding)`` of a transformers config (object or dict): what decides which routes
    can express the model (:func:`target_constraint`)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return FAMILIES.get(get("model_type", "") or ""), "sliding_attention" in (get("layer_types", None) or [])


def widths_violation(target: str, spaces: list[LayerSpace], widths: list[LayerWidth], family: str | None = None,
                     sliding: bool = False) -> str | None:
    """Why no route of ``target`` serves ``widths`` (per route, the first refusal), ``None`` when
    one does: for widths a user gave, which are checked, not chosen."""
    if target == "any":
        return None
    shapes = [(w.heads(s), w.kv_heads(s), w.channels) for s, w in zip(spaces, widths)]
    reasons = []
    for c in ROUTES[target]:
        why = c.refuses_model(family, sliding) or c.violation(shapes)
        if why is None:
            return None
        reasons.append(f"{c.route} route: {why}")
    return "; ".join(reasons)


def attention_allowed(s: LayerSpace, remove_groups: int, remove_per_group: int, c: Constraint | None,
                      whole_blocks: bool = False) -> bool:
    """Whether a layer may take this GQA shape under ``c``. With one head count per model (deci)
    only the dense attention, or the removed one when the caller decides ``whole_blocks`` (the
    search scores each removal; a schedule's rounding to "dense or nothing" would drop every
    attention past a layer ratio of 1/2); an empty attention never where the route keeps them."""
    if c is None:
        return True
    heads = (s.num_kv_heads - remove_groups) * (s.n_rep - remove_per_group)
    if heads == 0:
        return not c.keep_attention and (whole_blocks or not c.uniform_heads)
    return not c.uniform_heads or (remove_groups, remove_per_group) == (0, 0)


def ffn_top(s: LayerSpace, unit: int = 1) -> int:
    """The widest FFN a layer may keep: all its channels, or the largest multiple of ``unit``."""
    return s.channels if unit == 1 else s.channels // unit * unit


def _round_channels(s: LayerSpace, kept: float, unit: int) -> int:
    """``kept`` channels rounded to the nearest multiple of ``unit`` within ``[0, ffn_top]``."""
    if unit == 1:
        return min(max(round(kept), 0), s.channels)
    return min(max(round(kept / unit) * unit, 0), ffn_top(s, unit))


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


def round_layer(s: LayerSpace, ratio: float, attn_scale: float | None = None,
                constraint: Constraint | None = None) -> LayerWidth:
    """Round a layer's ratio to allowed shapes.

    ``attn_scale=None`` (the paper's schedules): attention to the (groups, per-group) combination
    whose parameter count is closest to ``(1 - ratio)`` of the attention parameters (ties: fewer
    whole groups removed), FFN to the nearest whole channel of ``(1 - ratio)``.

    ``attn_scale=a`` (the candidates of ``--schedule auto``): attention aims at ``a · ratio`` of its
    parameters and the FFN gives what makes the *layer* lose ``ratio`` of its parameters, so the
    head rounding is absorbed in the same layer (``a = 0``: FFN channels only).

    ``constraint``: only shapes it allows (:func:`attention_allowed`), FFN widths in its unit."""
    ratio = min(max(ratio, 0.0), 1.0)
    unit = constraint.ffn_unit if constraint is not None else 1
    attn_ratio = ratio if attn_scale is None else min(attn_scale * ratio, 1.0)
    g, r = _nearest_attention(s, attn_ratio, constraint)
    if attn_scale is None:
        return LayerWidth(g, r, _round_channels(s, (1 - ratio) * s.channels, unit), ratio)
    attn_removed = s.params - s.channels * s.per_channel - LayerWidth(g, r, 0, ratio).params(s)
    ffn_removed = ratio * s.params - attn_removed
    channels = _round_channels(s, s.channels - ffn_removed / s.per_channel, unit)
    return LayerWidth(g, r, channels, ratio)


def _nearest_attention(s: LayerSpace, ratio: float, constraint: Constraint | None = None) -> tuple[int, int]:
    """``(remove_groups, remove_per_group)`` keeping the nearest to ``1 - ratio`` of the attention
    parameters among the shapes ``constraint`` allows (ties: fewer whole groups removed); an empty
    attention is one shape."""
    attn_params = s.num_heads * s.per_q_head + s.num_kv_heads * s.per_kv_head
    want = (1 - ratio) * attn_params
    best = None
    for g in range(s.num_kv_heads + 1):
        for r in range(s.n_rep + 1):
            if not attention_allowed(s, g, r, constraint):
                continue
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
    constraint: Constraint | None = None,
) -> list[LayerWidth]:
    """Per-layer widths that remove ``target_ratio`` of ``total_params`` (all parameters).

    ``schedule`` may be a file of per-layer ratios; those are used as given and the target is
    ignored (the achieved ratio is reported by the caller). ``attn_scale`` splits each layer's
    ratio between attention and FFN (:func:`round_layer`); ``None`` is the paper's equal split.

    ``constraint`` (``--target``): every width is one the engine serves and the total lands
    within half an FFN unit of the target. A file's ratios are then honoured per layer (the FFN
    absorbs what the attention cannot give) and the total is solved onto what the file removes
    without the constraint."""
    n = len(spaces)
    unit = constraint.ffn_unit if constraint is not None else 1
    if schedule in ("search", "auto"):
        raise ConfigError(f"--schedule {schedule} is chosen from calibration statistics (--method slimgpt), "
                          "not solved here")
    if schedule not in SCHEDULES:
        ratios = load_schedule_file(schedule, n)
        free = [round_layer(s, r) for s, r in zip(spaces, ratios)]
        return free if constraint is None else _file_inside(spaces, ratios, removed_params(spaces, free), constraint)
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
        return [round_layer(s, r, attn_scale, constraint)
                for s, r in zip(spaces, schedule_ratios(schedule, n, first, last))]

    if constraint is not None:
        most = removed_params(spaces, widths_for(1.0, 1.0))
        if most < target:
            raise ConfigError(
                f"--ratio {target_ratio} cannot be reached inside the shapes the {constraint.route} route serves: "
                f"at most {most / 1e6:.1f}M parameters ({most / total_params:.1%}) can go; lower --ratio"
            )
        least = removed_params(spaces, [round_layer(s, 0.0, None, constraint) for s in spaces])
        if least - target > unit * min(s.per_channel for s in spaces) / 2:
            raise ConfigError(
                f"--ratio {target_ratio} is less than the {constraint.route} route's FFN widths (multiples of {unit}) "
                f"remove from this model at least ({least / total_params:.1%}); raise --ratio"
            )

    def bisect(make: Callable[[float], list[LayerWidth]], lo: float, hi: float) -> list[LayerWidth]:
        return _bisect(spaces, make, lo, hi, target)

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
    return _fine_tune(best, spaces, target, unit)


def _bisect(spaces: list[LayerSpace], make: Callable[[float], list[LayerWidth]], lo: float, hi: float,
            target: float) -> list[LayerWidth]:
    """The widths, monotone in the free parameter, whose removed count is nearest the target."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if removed_params(spaces, make(mid)) < target:
            lo = mid
        else:
            hi = mid
    return min((make(lo), make(hi)), key=lambda w: abs(removed_params(spaces, w) - target))


def _file_inside(spaces: list[LayerSpace], ratios: list[float], target: float, c: Constraint) -> list[LayerWidth]:
    """A ratio file inside ``c``: each layer loses its ratio of its parameters (the FFN absorbs what
    the allowed attention shapes cannot give), all ratios scaled by one factor so the total is what
    the file removes without ``c`` (a layer the engine cannot empty moves the rest onto the others
    in proportion, not onto the deepest ones), then the last units by :func:`_fine_tune`."""
    def make(m: float) -> list[LayerWidth]:
        return [round_layer(s, min(1.0, m * r), 1.0, c) for s, r in zip(spaces, ratios)]

    hi = 1.0
    while removed_params(spaces, make(hi)) < target and hi < 2**20:
        hi *= 2
    if removed_params(spaces, make(hi)) < target:
        raise ConfigError(f"the schedule file's ratios cannot be reached inside the shapes the {c.route} route "
                          "serves; give layers with ratio 0 some share, or lower the ratios")
    return _fine_tune(_bisect(spaces, make, 0.0, hi, target), spaces, target, c.ffn_unit)


def _fine_tune(widths: list[LayerWidth], spaces: list[LayerSpace], target: float, unit: int = 1) -> list[LayerWidth]:
    """Absorb the rounding residual in FFN widths, ``unit`` channels at a time, deepest layers
    first, so the total lands within half a unit of the target; the head rounding stays as solved."""
    widths = list(widths)
    for i in reversed(range(len(widths))):
        s, w = spaces[i], widths[i]
        k = round((target - removed_params(spaces, widths)) / (s.per_channel * unit)) * unit  # >0: remove more
        if k == 0:
            break
        widths[i] = replace(w, channels=min(max(w.channels - k, 0), ffn_top(s, unit)))
    return widths
