"""Candidate evaluation: stored variants swapped into one model, KL divergence from the dense model.

**Stitching.** :class:`Stitcher` installs a unit's variant with :class:`slimgpt.surgery.LayerSwap`,
the cut the final model gets (kept q/k/v rows and compensated ``o_proj`` columns; kept gate/up
rows and compensated ``down_proj`` columns; the head counts set through the adapter), so a
candidate runs at its pruned cost; a removed block is skipped. The dense tensors are kept and put
back by :meth:`Stitcher.restore`. Installing only touches units whose level changed, and never
copies the model.

**Fitness.** :class:`KLFitness` scores a candidate by the mean per-token
``KL(p_dense || p_candidate)`` of the next-token distributions on a selection stage's calibration
tokens: whole first windows, or a prefix of window 0 when the stage is shorter than a window
(EvoPress: more stable than perplexity; never evaluation text); per-window values are memoised. The dense probabilities
are computed once and kept in float16 (the KL is exact for those stored values: their rounding
perturbs only the cross-entropy weights, the same for every candidate), and a candidate's KL is
taken from its logits directly (:class:`DenseTarget`, the KL ``--schedule auto`` scores with too).
Candidates differ from their parent in a few units: the parent's hidden states at every block
boundary are cached (``set_parent``), and a candidate runs only from its first changed block on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import NumericalError
from slimgpt.search.database import LevelDatabase, Variant
from slimgpt.surgery import LayerSwap


class Stitcher:
    """Installs (unit, level) variants of ``db`` into ``adapter``'s model in place, each layer cut
    by :class:`slimgpt.surgery.LayerSwap` (the final model's cut) over its dense tensors."""

    def __init__(self, adapter: ModelAdapter, db: LevelDatabase) -> None:
        self.adapter, self.db = adapter, db
        self.levels = [0] * (2 * adapter.num_layers)
        self.swaps = [LayerSwap(adapter, i) for i in range(adapter.num_layers)]

    def top_level(self, u: int) -> int:
        """The level that removes unit ``u``'s block; -1 where none does (under ``--target vllm`` the
        attention's top level is its narrowest stored variant)."""
        i = u // 2
        if u % 2:
            return len(self.db.ffn_levels[i]) - 1
        top = len(self.db.attn_removed[i]) - 1
        return top if top and self.db.variant("attn", i, top) is None else -1

    def removed(self, u: int) -> bool:
        return self.levels[u] == self.top_level(u)

    def variant(self, u: int, level: int) -> Variant | None:
        return self.db.variant("attn" if u % 2 == 0 else "ffn", u // 2, level)

    @torch.no_grad()
    def set(self, u: int, level: int) -> None:
        """Put unit ``u`` at ``level`` (0 = dense, top = removed: the block is skipped)."""
        if self.levels[u] == level:
            return
        swap, attention = self.swaps[u // 2], u % 2 == 0
        swap.restore(attention=attention, mlp=not attention)
        self.levels[u] = level
        if level == 0 or level == self.top_level(u):
            return
        v = self.variant(u, level)
        assert v is not None, f"no variant for unit {u} level {level}"
        if attention:
            swap.cut(heads=v.kept, o_weight=v.weight)
        else:
            swap.cut(channels=v.kept, down_weight=v.weight)

    def install(self, levels: list[int]) -> None:
        for u, lv in enumerate(levels):
            self.set(u, lv)

    def restore(self) -> None:
        for u in range(len(self.levels)):
            self.set(u, 0)


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p || q) = sum_v p (log p - log q)`` from log-probabilities (last dim the
    vocabulary): the dense model is ``p``, the candidate ``q`` (EvoPress's direction). The plain
    form, for checks and benchmarks; the passes score with :class:`DenseTarget`."""
    return (logp.exp() * (logp - logq)).sum(-1)


class DenseTarget:
    """One window's dense next-token distributions, kept for scoring many candidates against them:
    ``p`` in float16 and, per token, ``Σ p log p`` and ``Σ p`` of exactly those stored values, so
    that :meth:`kl` needs only a candidate's logits ``z``:
    ``KL(p || softmax z) = Σ p log p − Σ p z + logsumexp(z) Σ p`` (no log-softmax of the candidate is
    formed: at a 49k-152k vocabulary the per-token V-wide passes cost as much as the forward). The
    one KL of the search and of ``--schedule auto``; exact for the stored ``p`` (their rounding
    perturbs only the weights of the cross-entropy, the same for every candidate)."""

    def __init__(self, logits: torch.Tensor) -> None:
        """``logits``: the dense model's, ``(tokens, vocabulary)``."""
        p = F.log_softmax(logits.float(), dim=-1).exp().half()
        pf = p.float()
        self.p = p
        self.plogp = torch.xlogy(pf, pf).sum(-1)
        self.psum = pf.sum(-1)

    def kl(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Per-token ``KL(p_dense || softmax(z))`` over the first ``length`` tokens (default: all);
        ``z``: a candidate's logits, ``(tokens, vocabulary)``."""
        n = self.p.shape[0] if length is None else length
        z = z[:n].float()
        cross = torch.linalg.vecdot(self.p[:n].float(), z)  # Σ_v p z, per token
        return self.plogp[:n] - cross + torch.logsumexp(z, -1) * self.psum[:n]


class KLFitness:
    """Mean per-token KL(dense || candidate) on a stage's calibration tokens (module docstring).

    ``fitness(levels, tokens)``: ``tokens >= seqlen`` scores the first ``ceil(tokens / seqlen)``
    whole windows; fewer scores the first ``tokens`` tokens of window 0 only (attention is causal,
    so that prefix's KL needs only those tokens forwarded), so a stage means the same at any
    ``--seqlen``. Each window's KL is memoised per ``(candidate, window, prefix)``: a survivor's
    earlier windows are not run again in a later stage (the memo is emptied when the parent
    changes, so what it returns was computed from the same parent cache). Windows run ``batch``
    at a time (``1`` keeps every value independent of which windows share a forward, so a resumed
    search repeats the uninterrupted one bit for bit)."""

    def __init__(self, adapter: ModelAdapter, stitcher: Stitcher, windows: torch.Tensor, device: torch.device,
                 batch: int = 1, memo: int = 65536) -> None:
        self.adapter, self.stitcher, self.device = adapter, stitcher, device
        self.windows = windows
        self.seqlen = windows.shape[1]
        self.batch = max(1, int(batch))
        self.memo_size = memo
        self.dtype = next(adapter.model.parameters()).dtype
        self._ctx: dict[int, Any] = {}
        self.units = 2 * adapter.num_layers
        self.block_passes = 0  # block forwards, one per block per window-batch
        self.evaluations = 0
        self.window_evaluations = 0  # windows forwarded (memo hits not counted)
        self.memo_hits = 0
        stitcher.restore()
        self.dense: list[DenseTarget] = []  # per window (DenseTarget: the one KL)
        with torch.no_grad():
            for ids in windows.split(self.batch):
                for z in self.adapter.logits(self._run(self._embed(ids), 0, self.seqlen)):
                    self.dense.append(DenseTarget(z))
        self._parent: list[int] | None = None
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._recorded: tuple[tuple[int, ...], dict[int, list[torch.Tensor]]] | None = None
        self._memo: OrderedDict[tuple[tuple[int, ...], int, int], float] = OrderedDict()
        self.record_windows = windows.shape[0]  # evaluations on this many windows keep their states

    def stage(self, tokens: int) -> tuple[int, int]:
        """``(windows, tokens per window)`` a stage of ``tokens`` scores."""
        tokens = int(tokens)
        if tokens <= 0:
            raise ValueError("a stage needs at least one token")
        n, length = (math.ceil(tokens / self.seqlen), self.seqlen) if tokens >= self.seqlen else (1, tokens)
        if n > self.windows.shape[0]:
            raise ValueError(f"{tokens} tokens need {n} windows; the fitness holds {self.windows.shape[0]}")
        return n, length

    def _context(self, length: int) -> Any:
        if length not in self._ctx:
            self._ctx[length] = self.adapter.context(length, self.device, self.dtype)
        return self._ctx[length]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(ids.to(self.device))

    def _run(self, h: torch.Tensor, start: int, length: int, record: list[torch.Tensor] | None = None) -> torch.Tensor:
        ctx = self._context(length)
        for b in range(start, self.units):
            if record is not None:
                record.append(h)
            if self.stitcher.removed(b):
                continue
            layer = self.adapter.layers[b // 2]
            self.block_passes += 1
            h = self.adapter.attention_block(layer, h, ctx) if b % 2 == 0 else self.adapter.mlp_block(layer, h)
        return h

    def _kl(self, h: torch.Tensor, ws: list[int], length: int) -> list[float]:
        """Each window's mean KL over its first ``length`` tokens (``h``: the batch's final states)."""
        z = self.adapter.logits(h)
        values = [float(self.dense[w].kl(z[k], length).mean()) for k, w in enumerate(ws)]
        if not all(math.isfinite(v) for v in values):
            raise NumericalError("NaN/inf logits while scoring a searched allocation; use --dtype float32")
        return values

    def _chunks(self, ws: list[int]) -> list[list[int]]:
        return [ws[k : k + self.batch] for k in range(0, len(ws), self.batch)]

    @torch.no_grad()
    def set_parent(self, levels: list[int], tokens: int) -> None:
        """Cache the hidden state entering every block of ``levels`` on the windows of ``tokens``
        (whole windows; taken from the last evaluation of ``levels`` that recorded them, the
        windows it did not run, e.g. memo hits, run now)."""
        n, _ = self.stage(tokens)
        adopted: dict[int, list[torch.Tensor]] = {}
        if self._recorded is not None and self._recorded[0] == tuple(levels):
            adopted = self._recorded[1]
        self._recorded = None
        self.stitcher.install(levels)
        if self._parent != list(levels):
            self._memo.clear()
        self._parent = list(levels)
        self._cache = {w: adopted[w] for w in range(n) if w in adopted}
        for chunk in self._chunks([w for w in range(n) if w not in self._cache]):
            rec: list[torch.Tensor] = []
            self._run(self._embed(self.windows[chunk]), 0, self.seqlen, rec)
            for k, w in enumerate(chunk):
                self._cache[w] = [x[k : k + 1] for x in rec]

    @torch.no_grad()
    def __call__(self, levels: list[int], tokens: int) -> float:
        """Mean KL over the stage's windows (each window weighs the same; see :meth:`stage`)."""
        n, length = self.stage(tokens)
        key = tuple(levels)
        values: dict[int, float] = {}
        for w in range(n):
            v = self._memo.get((key, w, length))
            if v is not None:
                values[w] = v
                self._memo.move_to_end((key, w, length))
        self.memo_hits += len(values)
        todo = [w for w in range(n) if w not in values]
        record = length == self.seqlen and n >= self.record_windows
        recorded: dict[int, list[torch.Tensor]] = {}
        if todo:
            self.stitcher.install(levels)
            start = 0
            if self._parent is not None:
                diff = [u for u in range(self.units) if levels[u] != self._parent[u]]
                start = diff[0] if diff else self.units - 1  # the parent itself: its last block from the cache
        for chunk in self._chunks(todo):
            cached = all(w in self._cache for w in chunk)
            s0 = start if cached else 0
            h = torch.cat([self._cache[w][s0][:, :length] for w in chunk]) if cached and s0 > 0 \
                else self._embed(self.windows[chunk, :length])
            rec: list[torch.Tensor] | None = [] if record else None
            h = self._run(h, s0, length, rec)
            for w, v in zip(chunk, self._kl(h, chunk, length)):
                values[w] = v
                self._memo[(key, w, length)] = v
            if rec is not None:
                for k, w in enumerate(chunk):
                    recorded[w] = (self._cache[w][:s0] if s0 else []) + [x[k : k + 1] for x in rec]
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        if record:
            self._recorded = (key, recorded)  # becomes the cache if this is the next parent
        self.evaluations += 1
        self.window_evaluations += len(todo)
        return sum(values[w] for w in range(n)) / n
