"""``--schedule auto``: the per-layer allocation chosen from the model's own calibration statistics.

The paper's Incremental Pruning Ratio fixes every layer's ratio by a hand-made log curve and gives
heads and channels the same ratio. Which allocation is good depends on the model (on
Qwen2.5-Coder-0.5B the log curve gave 1.6× FLAP's perplexity; pruning FFN channels only gave less
than FLAP's). So ``auto`` scores a small family of allocations on the model itself and keeps the
best (docs/auto_schedule.md has the numbers that chose the family):

* **candidates**: a depth curve (``uniform`` or the paper's ``log``) × an attention share
  ``a`` (attention loses ``a ×`` the layer's ratio, the FFN the rest of the layer's budget:
  ``a = 0`` prunes FFN channels only), plus the paper's log schedule itself. Every candidate is
  solved onto the same whole-model parameter budget (:func:`slimgpt.schedule.solve_widths`), so
  they differ only in where the parameters go;
* **one dense pass** over the first windows of the calibration (:func:`auto_windows`), layer by
  layer (:meth:`~slimgpt.runner.LayerRunner.dense_pass`: one attention and one MLP forward
  give the Hessians of ``o_proj``'s and ``down_proj``'s inputs and the dense outputs); every
  candidate's variant of the layer pruned from those Hessians with SlimGPT's OBS solvers
  (grouped-Cholesky heads; FFN channels along one nested greedy path per layer, groups of at most
  C/64 channels with compensation, which passes through every candidate's width in one solve:
  per-width Dynamic Group Size solves made the pass 2× too slow), cut into the layer by
  :class:`slimgpt.surgery.LayerSwap` (the final model's cut), and every candidate's hidden states
  on the scoring windows advanced through it. Only the current layer and the candidates' hidden
  states are held: no variant database;
* **score**: mean per-token ``KL(p_dense || p_candidate)`` of the next-token distributions
  (EvoPress's fitness, :class:`slimgpt.search.fitness.DenseTarget`) on **scoring windows the
  Hessians did not see** (the calibration windows right after the Hessian windows: on the windows
  it was solved from, a candidate's score would include its compensation's in-sample fit); the lowest wins, and
  sequential SlimGPT then prunes the model at the winner's widths (the ordinary layer-wise run,
  streaming and checkpoints included). The report keeps the choice, every candidate's score (and
  per window) and the windows.

The pass reads weights through a :class:`Weights` access: the model's own (:class:`ResidentWeights`,
each layer moved to the device while it is worked on) or, for a run streamed from disk, one layer at
a time from the checkpoint files (:class:`slimgpt.streaming.StreamedWeights`).

The cost is the dense pass on ``nsamples / 4`` windows plus ``(candidates + 1) × score windows``
layer forwards and one solve per distinct variant: under one extra log-schedule run.

A widths file (:func:`read_widths_file`: ``allocation.json`` of a run's work folder, or a list of
per-layer widths) given as ``--schedule`` prunes at exactly those widths, so any candidate can be
built for real (``benchmarks/auto_proxy.py`` does, to check that the score ranks them as their
perplexities do).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.runner import DensePass, LayerRunner, Timer, embed_batches
from slimgpt.schedule import LayerSpace, LayerWidth, removed_params, solve_widths
from slimgpt.search.database import ffn_path
from slimgpt.search.fitness import DenseTarget
from slimgpt.serving import Constraint
from slimgpt.solvers.heads import HeadScore, prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.surgery import LayerSwap, head_rows
from slimgpt.twin import on_device

log = logging.getLogger(__name__)

ATTN_SCALES = (0.0, 0.5, 1.0)
"""Attention shares tried with each depth curve (0: FFN channels only; 1: the layer's ratio, as the
paper). 2 (attention at twice the layer's ratio) was measured and left out: it never won (SmolLM2
KL 0.72-9.7 against the winners' 0.36-1.84, docs/auto_schedule.md), and each member costs scoring time."""
CURVES = ("uniform", "log")
"""Depth curves: the same ratio in every layer; the paper's log curve (layer 0 at ``--first-ratio``
or the mean / 3.2). A flatter log curve (layer 0 at 0.6 × the mean) was tried at 20 % on SmolLM2
and did not win (docs/auto_schedule.md)."""


@dataclass
class AutoSettings:
    """Which calibration windows the allocation pass reads (see :func:`auto_windows`): the first
    ``hessian_windows`` give the Hessians the candidates are solved from, the windows at
    ``score_at`` (indices into the calibration) are scored; the pipeline keeps the two disjoint."""

    hessian_windows: int
    score_at: list[int]
    head_score: HeadScore = "gcd"
    min_group: int = 8
    damp: float = 0.01
    batch_size: int = 8


@dataclass
class AutoResult:
    widths: list[LayerWidth]
    chosen: str
    scores: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    window_scores: dict[str, list[float]] = field(default_factory=dict)  # per candidate, per scoring window

    def summary(self) -> dict[str, Any]:
        """What the run's report keeps: the choice, every candidate's score (and per window), the
        windows, the time."""
        return {"chosen": self.chosen, "kl": {k: round(v, 6) for k, v in self.scores.items()},
                "kl_by_window": {k: [round(x, 6) for x in v] for k, v in self.window_scores.items()},
                "time_s": {k: round(v, 3) for k, v in self.seconds.items()}, **self.settings}

    def to_dict(self) -> dict[str, Any]:
        """Everything, exactly (the checkpoint keeps it for ``--resume``)."""
        return {"widths": [asdict(w) for w in self.widths], "chosen": self.chosen, "scores": self.scores,
                "seconds": self.seconds, "settings": self.settings, "window_scores": self.window_scores}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AutoResult:
        """A result read back from the checkpoint: no time spent choosing it in this run."""
        return cls([LayerWidth(**w) for w in doc["widths"]], doc["chosen"], doc["scores"], {"total": 0.0},
                   {**doc["settings"], "from_checkpoint": True, "chosen_in_s": doc["seconds"].get("total")},
                   doc.get("window_scores", {}))


SCORE_TOKENS = 2048
"""Tokens the candidates are scored on (at least 4 windows)."""


def auto_windows(nsamples: int, seqlen: int, spaces: list[LayerSpace]) -> tuple[int, int]:
    """``(Hessian windows, scoring windows)``: the first are the first windows of the calibration,
    the scoring windows the ones right after them, so a candidate is never scored on the tokens
    it was solved from (scored in-sample, the compensation's own fit flatters the candidates that
    compensate most).

    The Hessians get a quarter of the calibration, but at least twice the widest FFN in tokens (so
    every Hessian is of full rank before damping); the scoring :data:`SCORE_TOKENS` tokens (at least
    4 windows). When the calibration holds fewer than both, the scoring keeps a quarter of it (at
    least one window) and the Hessians the rest."""
    if nsamples < 2:
        raise ConfigError("--schedule auto scores its candidates on calibration windows its Hessians did not see: "
                          "it needs --nsamples 2 or more; raise --nsamples or use --schedule log")
    widest = max(s.channels for s in spaces)
    hess = max(nsamples // 4, math.ceil(2 * widest / seqlen), 1)
    score = max(4, math.ceil(SCORE_TOKENS / seqlen))
    if hess + score > nsamples:
        score = min(score, max(1, nsamples // 4))
        hess = min(hess, nsamples - score)
    return hess, score


def candidates(spaces: list[LayerSpace], total_params: int, ratio: float,
               first_ratio: float | None = None, constraint: Constraint | None = None) -> dict[str, list[LayerWidth]]:
    """The allocation family (module docstring), each on the parameter budget; names are
    ``CURVE-aA`` plus ``log`` (the paper's schedule, ``first_ratio`` as given). Infeasible members
    (FFN-only beyond what the FFNs hold) are left out; duplicates keep the first name.
    ``constraint`` (``--target``): every member is solved inside the shapes it allows."""
    out: dict[str, list[LayerWidth]] = {
        "log": solve_widths(spaces, total_params, ratio, "log", first_ratio, constraint=constraint)}
    for curve in CURVES:
        for a in ATTN_SCALES:
            try:
                w = solve_widths(spaces, total_params, ratio, curve, first_ratio, attn_scale=a, constraint=constraint)
            except ConfigError:
                continue
            if all(_shape(w) != _shape(v) for v in out.values()):
                out[f"{curve}-a{a:g}"] = w
    return out


def _shape(widths: list[LayerWidth]) -> list[tuple[int, int, int]]:
    return [(w.remove_groups, w.remove_per_group, w.channels) for w in widths]


def read_widths_file(path: str | Path, spaces: list[LayerSpace]) -> list[LayerWidth] | None:
    """Per-layer widths from a JSON file given as ``--schedule``: a list of ``{"remove_groups",
    "remove_per_group", "channels"}`` (one per layer; ``"ratio"`` optional), or an object whose
    ``"widths"`` is that list (a run's ``allocation.json``). ``None`` when the file is a list of
    ratios instead (:func:`slimgpt.schedule.load_schedule_file` reads those)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None  # not JSON: a ratio per line
    items = doc.get("widths") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items):
        if isinstance(doc, dict):
            raise ConfigError(f"schedule file {p} is an object without a \"widths\" list; give per-layer widths or ratios")
        return None
    if len(items) != len(spaces):
        raise ConfigError(f"widths file {p} has {len(items)} layers but the model has {len(spaces)}")
    out = []
    for i, (x, s) in enumerate(zip(items, spaces)):
        try:
            g, r, c = (int(x[k]) for k in ("remove_groups", "remove_per_group", "channels"))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"widths file {p}, layer {i}: needs integer remove_groups, remove_per_group and "
                              f"channels; got {x}") from None
        if not (0 <= g <= s.num_kv_heads and 0 <= r <= s.n_rep and 0 <= c <= s.channels):
            raise ConfigError(f"widths file {p}, layer {i}: remove_groups within 0..{s.num_kv_heads}, remove_per_group "
                              f"within 0..{s.n_rep} and channels within 0..{s.channels}; got {x}")
        w = LayerWidth(g, r, c, 0.0)
        out.append(LayerWidth(g, r, c, float(x.get("ratio", 1 - w.params(s) / s.params))))
    return out


# ---------------------------------------------------------------------------------- layer variants
@dataclass
class _Variant:
    """One candidate's pruned layer: kept query heads / channels and compensated output columns
    (``None``: that block is dense; an empty list: the block is removed)."""

    heads: list[int] | None = None
    o_weight: torch.Tensor | None = None
    channels: list[int] | None = None
    down_weight: torch.Tensor | None = None


def _install(swap: LayerSwap, v: _Variant) -> None:
    """Cut the layer to variant ``v`` (surgery's cut; a removed block is skipped, not cut)."""
    swap.cut(heads=v.heads or None, o_weight=v.o_weight, channels=v.channels or None, down_weight=v.down_weight)


def _forward(adapter: ModelAdapter, layer: nn.Module, v: _Variant, h: torch.Tensor, ctx: Any) -> torch.Tensor:
    """The layer as variant ``v`` computes it (a removed block is skipped)."""
    if v.heads != []:
        h = adapter.attention_block(layer, h, ctx)
    if v.channels != []:
        h = adapter.mlp_block(layer, h)
    return h


# ---------------------------------------------------------------------------------- weights
class Weights(Protocol):
    """Where the pass finds the weights it needs, each only while it is needed."""

    def embedding(self) -> AbstractContextManager[None]: ...

    def layer(self, index: int) -> AbstractContextManager[None]: ...

    def head(self) -> AbstractContextManager[None]: ...


class ResidentWeights:
    """The model's own weights: a layer, and the final norm and head for the scoring, sit on the
    device while they are used and go back home (the CPU when layers are offloaded) afterwards."""

    def __init__(self, adapter: ModelAdapter, device: torch.device) -> None:
        self.adapter, self.device = adapter, device

    def embedding(self) -> AbstractContextManager[None]:
        return nullcontext()  # embed_batches moves what it embeds

    def layer(self, index: int) -> AbstractContextManager[None]:
        return on_device(self.adapter.layers[index], self.device)

    @contextmanager
    def head(self) -> Iterator[None]:
        with on_device(self.adapter.decoder.norm, self.device), on_device(self.adapter.model.lm_head, self.device):
            yield


# ---------------------------------------------------------------------------------- the pass
@torch.no_grad()
def choose_allocation(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    spaces: list[LayerSpace],
    family: dict[str, list[LayerWidth]],
    device: torch.device,
    settings: AutoSettings,
    progress: bool = True,
    weights: Weights | None = None,
) -> AutoResult:
    """Score every allocation in ``family`` by KL on the scoring windows (module docstring); the
    lowest wins (ties: the earlier name). The model's weights are left as they were; ``weights``
    says where they are read (default: the model's own)."""
    t0 = time.perf_counter()
    timer = Timer(device)
    weights = weights if weights is not None else ResidentWeights(adapter, device)
    dtype = next(adapter.model.parameters()).dtype
    names = list(family)
    n_hess, score_at = settings.hessian_windows, list(settings.score_at)
    if not score_at or not 0 < n_hess <= calib.shape[0] or not all(0 <= w < calib.shape[0] for w in score_at):
        raise ValueError(f"windows out of range: {n_hess} Hessian windows, scoring at {score_at} of {calib.shape[0]}")
    ctx = adapter.context(calib.shape[1], device, dtype)
    offload = torch.device("cpu")
    with timer("forward"), weights.embedding():
        hidden = embed_batches(adapter, calib[:n_hess], settings.batch_size, offload)
        dense_states = embed_batches(adapter, calib[score_at], 1, offload)  # the scoring windows, one by one
    states = {n: list(dense_states) for n in names}  # per candidate, per scoring window
    bar = tqdm(range(adapter.num_layers), desc="auto schedule: layers", disable=not progress)
    for i in bar:
        layer = adapter.layers[i]
        with weights.layer(i):
            run = LayerRunner(i, layer, adapter, hidden, ctx, device, timer)
            dense = run.dense_pass()  # one forward: both Hessians and the dense outputs
            hidden = [o.to(offload) for o in dense.outputs]  # every variant of the next layer sees dense inputs
            variants = _layer_variants(run, dense, spaces[i], {n: family[n][i] for n in names}, settings, timer)
            del run, dense
            swap = LayerSwap(adapter, i)
            with timer("forward"):
                dense_states = [_forward(adapter, layer, _Variant(), x.to(device), ctx).to(offload)
                                for x in dense_states]
                for n in names:
                    v = variants[n]
                    try:
                        _install(swap, v)
                        states[n] = [_forward(adapter, layer, v, x.to(device), ctx).to(offload) for x in states[n]]
                    finally:
                        swap.restore()
            del variants, swap
    with timer("score"), weights.head():
        per_window = _kl(adapter, dense_states, states, device)
    scores = {n: sum(v) / len(v) for n, v in per_window.items()}
    chosen = min(names, key=lambda n: (scores[n], names.index(n)))
    secs = {**timer.seconds, "total": time.perf_counter() - t0}
    log.info("auto schedule: %s → %s (%.1f s)", ", ".join(f"{n} KL {scores[n]:.4f}" for n in names), chosen,
             secs["total"])
    windows = {"hessian": [0, n_hess], "score": score_at, "disjoint": not any(w < n_hess for w in score_at),
               "tokens_per_window": calib.shape[1]}
    return AutoResult(family[chosen], chosen, scores, secs,
                      {"hessian_windows": n_hess, "score_windows": len(score_at), "windows": windows,
                       "candidates": {n: removed_params(spaces, family[n]) for n in names}},
                      per_window)


def _layer_variants(run: LayerRunner, dense: DensePass, s: LayerSpace, widths: dict[str, LayerWidth],
                    st: AutoSettings, timer: Timer) -> dict[str, _Variant]:
    """Each candidate's variant of this layer from the dense Hessians: heads solved once per
    distinct shape (SlimGPT's ``prune_heads`` and head score), channels read off one nested path."""
    adapter, layer, i = run.adapter, run.layer, run.index
    geo = adapter.geometry(layer)
    attn: dict[tuple[int, int], tuple[list[int] | None, torch.Tensor | None]] = {}
    ffn: dict[int, tuple[list[int] | None, torch.Tensor | None]] = {}
    need_attn = {(w.remove_groups, w.remove_per_group) for w in widths.values()} - {(0, 0)}
    need_ffn = {w.channels for w in widths.values()} - {s.channels}
    if need_attn:
        o = adapter.attention(layer).o
        H = dense.attn_hessian
        with timer("solver"):
            Hinv, _ = damped_inverse(H, st.damp, where=f"layer {i} o_proj")
            dead = dead_columns(H)
            for g, r in sorted(need_attn):
                if (s.num_kv_heads - g) * (s.n_rep - r) == 0:
                    attn[(g, r)] = ([], None)
                    continue
                W = o.weight.data.float().clone()
                res = prune_heads(W, Hinv.clone(), geo.num_heads, geo.num_kv_heads, geo.head_dim, g, r,
                                  st.head_score, dead=dead)
                cols = head_rows(res.kept_heads, geo.head_dim, W.device)
                attn[(g, r)] = (res.kept_heads, W[:, cols].to(o.weight.dtype).contiguous())
    if need_ffn:
        down = adapter.mlp(layer).down
        H = dense.mlp_hessian
        with timer("solver"):
            Hinv, _ = damped_inverse(H, st.damp, where=f"layer {i} down_proj")
            if 0 in need_ffn:
                ffn[0] = ([], None)
            counts = ffn_counts(s.channels, need_ffn - {0}, ffn_step(s.channels, st.min_group))
            # only the candidates' widths are kept: the whole path (64 steps) held 7 GiB at 8B's F = 14,336
            wanted = [c for c in counts[1:] if c in need_ffn]
            path = ffn_path(down.weight.data.float().clone(), Hinv, counts, keep=need_ffn) if len(counts) > 1 else []
            for c, (kept, w, _err) in zip(wanted, path, strict=True):
                ffn[c] = (kept, w.to(down.weight.dtype).contiguous())
    out = {}
    for n, w in widths.items():
        heads, ow = attn.get((w.remove_groups, w.remove_per_group), (None, None))
        ch, dw = ffn.get(w.channels, (None, None))
        out[n] = _Variant(heads, ow, ch, dw)
    return out


def ffn_step(channels: int, min_group: int = 8) -> int:
    """Channels per step of the scoring path: 64 steps across the FFN, at least ``min_group``."""
    return max(min_group, math.ceil(channels / 64))


def ffn_counts(channels: int, needed: set[int], step: int) -> list[int]:
    """Kept-channel counts the scoring path passes through, descending from ``channels``: every
    ``step`` channels, and every width a candidate needs."""
    return sorted(set(range(channels, 0, -step)) | {c for c in needed if 0 < c < channels} | {channels},
                  reverse=True)


def _kl(adapter: ModelAdapter, dense: list[torch.Tensor], cands: dict[str, list[torch.Tensor]],
        device: torch.device) -> dict[str, list[float]]:
    """Per candidate, per scoring window, the per-token mean ``KL(p_dense || p_cand)``
    (:class:`slimgpt.search.fitness.DenseTarget`, the search's KL). Windows outside, candidates
    inside: the dense distributions are formed once per window and held for one window only (at
    8B's 128k vocabulary the head is most of the scoring)."""
    out: dict[str, list[float]] = {n: [] for n in cands}
    for w, d in enumerate(dense):
        target = DenseTarget(adapter.logits(d.to(device))[0])
        for n, states in cands.items():
            out[n].append(float(target.kl(adapter.logits(states[w].to(device))[0]).mean()))
        del target
    if not all(math.isfinite(x) for v in out.values() for x in v):
        raise NumericalError("NaN/inf logits while scoring --schedule auto; use --dtype float32 or --schedule log")
    return out
