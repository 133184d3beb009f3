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
* **one dense pass** over a subset of the calibration windows, layer by layer: per layer the
  Hessians of ``o_proj``'s and ``down_proj``'s inputs, every candidate's variant of the layer pruned
  from them with SlimGPT's OBS solvers (grouped-Cholesky heads; FFN channels along one nested
  greedy path per layer, groups of at most C/64 channels with compensation, which passes through
  every candidate's width in one solve: per-width Dynamic Group Size solves made the pass 2× too
  slow), and every candidate's hidden states on a few scoring windows advanced through its
  variant. Only the current layer and the candidates' hidden states are held: no variant database;
* **score**: mean per-token ``KL(p_dense || p_candidate)`` of the next-token distributions on the
  scoring windows (EvoPress's fitness); the lowest wins, and sequential SlimGPT then prunes the
  model at the winner's widths (the ordinary layer-wise run, streaming and checkpoints included).

The pass reads weights through a :class:`Weights` access: the model's own (:class:`ResidentWeights`,
each layer moved to the device while it is worked on) or, for a run streamed from disk, one layer at
a time from the checkpoint files (:class:`slimgpt.streaming.StreamedWeights`).

The cost is the dense pass on ``nsamples / 4`` windows plus ``candidates × score windows`` layer
forwards and one solve per distinct variant: under one extra log-schedule run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.methods.base import LayerRunner, Timer, embed_batches
from slimgpt.schedule import LayerSpace, LayerWidth, removed_params, solve_widths
from slimgpt.search.database import ffn_path
from slimgpt.search.fitness import token_kl
from slimgpt.solvers.heads import HeadScore, prune_heads
from slimgpt.solvers.hessian import damped_inverse, dead_columns
from slimgpt.surgery import head_rows
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
    """How much calibration the allocation pass reads (see :func:`auto_windows`)."""

    hessian_windows: int
    score_windows: int
    head_score: HeadScore = "gcd"
    ffn_groups: int | str = "dynamic"
    min_group: int = 8
    max_group: int = 1024
    damp: float = 0.01
    batch_size: int = 8


@dataclass
class AutoResult:
    widths: list[LayerWidth]
    chosen: str
    scores: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "kl": {k: round(v, 6) for k, v in self.scores.items()},
                "time_s": {k: round(v, 3) for k, v in self.seconds.items()}, **self.settings}

    def to_dict(self) -> dict[str, Any]:
        """Everything, exactly (the checkpoint keeps it for ``--resume``)."""
        return {"widths": [asdict(w) for w in self.widths], "chosen": self.chosen, "scores": self.scores,
                "seconds": self.seconds, "settings": self.settings}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AutoResult:
        """A result read back from the checkpoint: no time spent choosing it in this run."""
        return cls([LayerWidth(**w) for w in doc["widths"]], doc["chosen"], doc["scores"], {"total": 0.0},
                   {**doc["settings"], "from_checkpoint": True, "chosen_in_s": doc["seconds"].get("total")})


def auto_windows(nsamples: int, seqlen: int, spaces: list[LayerSpace]) -> tuple[int, int]:
    """``(Hessian windows, scoring windows)``: a quarter of the calibration, but at least twice the
    widest FFN in tokens (so every Hessian is of full rank before damping), and at most all of it;
    4 scoring windows (at least 2,048 tokens)."""
    widest = max(s.channels for s in spaces)
    need = math.ceil(2 * widest / seqlen)
    hess = min(nsamples, max(nsamples // 4, need, 1))
    score = min(hess, max(4, math.ceil(2048 / seqlen)))
    return hess, score


def candidates(spaces: list[LayerSpace], total_params: int, ratio: float,
               first_ratio: float | None = None) -> dict[str, list[LayerWidth]]:
    """The allocation family (module docstring), each on the parameter budget; names are
    ``CURVE-aA`` plus ``log`` (the paper's schedule, ``first_ratio`` as given). Infeasible members
    (FFN-only beyond what the FFNs hold) are left out; duplicates keep the first name."""
    out: dict[str, list[LayerWidth]] = {"log": solve_widths(spaces, total_params, ratio, "log", first_ratio)}
    for curve in CURVES:
        for a in ATTN_SCALES:
            try:
                w = solve_widths(spaces, total_params, ratio, curve, first_ratio, attn_scale=a)
            except ConfigError:
                continue
            if all(_shape(w) != _shape(v) for v in out.values()):
                out[f"{curve}-a{a:g}"] = w
    return out


def _shape(widths: list[LayerWidth]) -> list[tuple[int, int, int]]:
    return [(w.remove_groups, w.remove_per_group, w.channels) for w in widths]


# ---------------------------------------------------------------------------------- layer variants
@dataclass
class _Variant:
    """One candidate's pruned layer: kept query heads / channels and compensated output columns
    (``None``: that block is dense; an empty list: the block is removed)."""

    heads: list[int] | None = None
    o_weight: torch.Tensor | None = None
    channels: list[int] | None = None
    down_weight: torch.Tensor | None = None


class _Swap:
    """Puts a variant's sliced tensors into a layer and takes them out again (the dense tensors are
    never copied or edited)."""

    def __init__(self, adapter: ModelAdapter, layer: nn.Module) -> None:
        self.adapter, self.layer = adapter, layer
        a, m = adapter.attention(layer), adapter.mlp(layer)
        self.lin = {f"attn.{n}": getattr(a, n) for n in "qkvo"} | {f"mlp.{n}": getattr(m, n) for n in ("gate", "up", "down")}
        self.dense = {k: (v.weight, v.bias, v.out_features, v.in_features) for k, v in self.lin.items()}
        self.groups = getattr(layer.self_attn, "num_key_value_groups", None)
        self.geo = adapter.geometry(layer)

    def _set(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        lin = self.lin[name]
        lin.weight = nn.Parameter(weight, requires_grad=False)
        lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        lin.out_features, lin.in_features = weight.shape

    def install(self, v: _Variant) -> None:
        geo, d = self.geo, self.dense
        if v.heads:
            kv = sorted({h // geo.n_rep for h in v.heads})
            rows = head_rows(v.heads, geo.head_dim, d["attn.q"][0].device)
            kv_rows = head_rows(kv, geo.head_dim, d["attn.k"][0].device)
            for n, r in (("attn.q", rows), ("attn.k", kv_rows), ("attn.v", kv_rows)):
                w, b = d[n][:2]
                self._set(n, w[r], None if b is None else b[r])
            assert v.o_weight is not None
            self._set("attn.o", v.o_weight, d["attn.o"][1])
            if self.groups is not None:
                self.layer.self_attn.num_key_value_groups = len(v.heads) // len(kv)
        if v.channels:
            idx = torch.tensor(v.channels, dtype=torch.long, device=d["mlp.gate"][0].device)
            for n in ("mlp.gate", "mlp.up"):
                w, b = d[n][:2]
                self._set(n, w[idx], None if b is None else b[idx])
            assert v.down_weight is not None
            self._set("mlp.down", v.down_weight, d["mlp.down"][1])

    def restore(self) -> None:
        for n, (w, b, out_f, in_f) in self.dense.items():
            lin = self.lin[n]
            lin.weight, lin.bias, lin.out_features, lin.in_features = w, b, out_f, in_f
        if self.groups is not None:
            self.layer.self_attn.num_key_value_groups = self.groups


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
    """Score every allocation in ``family`` by calibration KL (module docstring); the lowest wins
    (ties: the earlier name). The model's weights are left as they were; ``weights`` says where they
    are read (default: the model's own)."""
    t0 = time.perf_counter()
    timer = Timer(device)
    weights = weights if weights is not None else ResidentWeights(adapter, device)
    dtype = next(adapter.model.parameters()).dtype
    names = list(family)
    assert settings.score_windows <= settings.hessian_windows, "scoring windows are a prefix of the Hessian windows"
    hess_calib = calib[: settings.hessian_windows]
    score_calib = calib[: settings.score_windows]
    ctx = adapter.context(calib.shape[1], device, dtype)
    offload = torch.device("cpu")
    with timer("forward"), weights.embedding():
        hidden = embed_batches(adapter, hess_calib, settings.batch_size, offload)
        start = embed_batches(adapter, score_calib, 1, offload)
    states = {n: [x.clone() for x in start] for n in names}  # per candidate, per scoring window
    bar = tqdm(range(adapter.num_layers), desc="auto schedule: layers", disable=not progress)
    for i in bar:
        layer, s = adapter.layers[i], spaces[i]
        with weights.layer(i):
            run = LayerRunner(i, layer, adapter, hidden, ctx, device, timer)
            variants = _layer_variants(run, s, {n: family[n][i] for n in names}, settings, timer)
            swap = _Swap(adapter, layer)
            with timer("forward"):
                for n in names:
                    v = variants[n]
                    try:
                        swap.install(v)
                        states[n] = [_forward(adapter, layer, v, x.to(device), ctx).to(offload) for x in states[n]]
                    finally:
                        swap.restore()
            hidden = [o.to(offload) for o in run.outputs()]  # dense propagation: every variant sees dense inputs
            del run, variants, swap
    # the scoring windows are the first Hessian windows: their dense outputs are already in ``hidden``
    dense_final = list(torch.cat(hidden)[: settings.score_windows].split(1))
    with timer("score"), weights.head():
        scores = _kl(adapter, dense_final, states, device)
    chosen = min(names, key=lambda n: (scores[n], names.index(n)))
    secs = {**timer.seconds, "total": time.perf_counter() - t0}
    log.info("auto schedule: %s → %s (%.1f s)", ", ".join(f"{n} KL {scores[n]:.4f}" for n in names), chosen,
             secs["total"])
    return AutoResult(family[chosen], chosen, scores, secs,
                      {"hessian_windows": hess_calib.shape[0], "score_windows": score_calib.shape[0],
                       "candidates": {n: removed_params(spaces, family[n]) for n in names}})


def _layer_variants(run: LayerRunner, s: LayerSpace, widths: dict[str, LayerWidth], st: AutoSettings,
                    timer: Timer) -> dict[str, _Variant]:
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
        H = run.attention_hessian(o)
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
        H = run.mlp_hessian()
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
        device: torch.device) -> dict[str, float]:
    """Per candidate, the mean over windows of the per-token mean ``KL(p_dense || p_cand)`` (every
    window weighs the same). Windows outside, candidates inside: the dense log-probabilities are
    computed once per window (at 8B's 128k vocabulary the head is most of the scoring)."""
    totals = dict.fromkeys(cands, 0.0)
    for w, d in enumerate(dense):
        logp = F.log_softmax(adapter.logits(d.to(device)[0]).float(), dim=-1)
        for n, states in cands.items():
            logq = F.log_softmax(adapter.logits(states[w].to(device)[0]).float(), dim=-1)
            totals[n] += float(token_kl(logp, logq).mean())
            del logq
        del logp
    scores = {n: t / len(dense) for n, t in totals.items()}
    if not all(math.isfinite(v) for v in scores.values()):
        raise NumericalError("NaN/inf logits while scoring --schedule auto; use --dtype float32 or --schedule log")
    return scores
