"""Candidate evaluation: stored variants swapped into one model, KL divergence from the dense model.

**Stitching.** :class:`Stitcher` installs a unit's variant by replacing the layer's weights with
*sliced* tensors (kept q/k/v rows and compensated ``o_proj`` columns; kept gate/up rows and
compensated ``down_proj`` columns; the attention's ``num_key_value_groups`` set as the slim
modelling code sets it), so a candidate runs at its pruned cost; a removed block is skipped. The
dense tensors are kept and put back by :meth:`Stitcher.restore`. Installing only touches units
whose level changed, and never copies the model.

**Fitness.** :class:`KLFitness` scores a candidate by the mean per-token
``KL(p_dense || p_candidate)`` of the next-token distributions on the first ``n`` calibration
windows (EvoPress: more stable than perplexity; never evaluation text). The dense log-probabilities
are computed once and kept in float16 (the dense entropy term is the same for every candidate, so
their rounding cannot reorder candidates by more than it perturbs the cross-entropy weights).
Candidates differ from their parent in a few units: the parent's hidden states at every block
boundary are cached (``set_parent``), and a candidate runs only from its first changed block on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import NumericalError
from slimgpt.search.database import LevelDatabase, Variant
from slimgpt.surgery import head_rows


class Stitcher:
    """Installs (unit, level) variants of ``db`` into ``adapter``'s model in place."""

    def __init__(self, adapter: ModelAdapter, db: LevelDatabase) -> None:
        self.adapter, self.db = adapter, db
        self.levels = [0] * (2 * adapter.num_layers)
        self._dense: list[dict[str, Any]] = []
        for layer in adapter.layers:
            a, m = adapter.attention(layer), adapter.mlp(layer)
            lin = {f"attn.{n}": getattr(a, n) for n in "qkvo"} | {f"mlp.{n}": getattr(m, n) for n in ("gate", "up", "down")}
            self._dense.append({
                "params": {k: (v.weight, v.bias) for k, v in lin.items()},
                "groups": getattr(layer.self_attn, "num_key_value_groups", None),
                "geo": adapter.geometry(layer),
            })

    def top_level(self, u: int) -> int:
        i = u // 2
        return len(self.db.attn_removed[i]) - 1 if u % 2 == 0 else len(self.db.ffn_levels[i]) - 1

    def removed(self, u: int) -> bool:
        return self.levels[u] == self.top_level(u)

    def _linears(self, i: int) -> dict[str, nn.Linear]:
        layer = self.adapter.layers[i]
        a, m = self.adapter.attention(layer), self.adapter.mlp(layer)
        return {f"attn.{n}": getattr(a, n) for n in "qkvo"} | {f"mlp.{n}": getattr(m, n) for n in ("gate", "up", "down")}

    @staticmethod
    def _set(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        dev, dt = lin.weight.device, lin.weight.dtype
        lin.weight = nn.Parameter(weight.to(device=dev, dtype=dt), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(device=dev, dtype=dt), requires_grad=False)
        lin.out_features, lin.in_features = lin.weight.shape

    def _restore_unit(self, u: int) -> None:
        i = u // 2
        lins, dense = self._linears(i), self._dense[i]
        names = [n for n in lins if n.startswith("attn." if u % 2 == 0 else "mlp.")]
        for n in names:
            w, b = dense["params"][n]
            lins[n].weight, lins[n].bias = w, b
            lins[n].out_features, lins[n].in_features = w.shape
        if u % 2 == 0 and dense["groups"] is not None:
            self.adapter.layers[i].self_attn.num_key_value_groups = dense["groups"]

    def variant(self, u: int, level: int) -> Variant | None:
        return self.db.variant("attn" if u % 2 == 0 else "ffn", u // 2, level)

    @torch.no_grad()
    def set(self, u: int, level: int) -> None:
        """Put unit ``u`` at ``level`` (0 = dense, top = removed: the block is skipped)."""
        if self.levels[u] == level:
            return
        self._restore_unit(u)
        self.levels[u] = level
        if level == 0 or level == self.top_level(u):
            return
        v = self.variant(u, level)
        assert v is not None, f"no variant for unit {u} level {level}"
        i = u // 2
        lins, dense = self._linears(i), self._dense[i]
        p = dense["params"]
        if u % 2 == 0:
            geo = dense["geo"]
            heads = v.kept
            kv = sorted({h // geo.n_rep for h in heads})
            dev = p["attn.q"][0].device
            q_rows, kv_rows = head_rows(heads, geo.head_dim, dev), head_rows(kv, geo.head_dim, dev)
            for n, rows in (("attn.q", q_rows), ("attn.k", kv_rows), ("attn.v", kv_rows)):
                w, b = p[n]
                self._set(lins[n], w[rows], None if b is None else b[rows])
            self._set(lins["attn.o"], v.weight, None)
            self.adapter.layers[i].self_attn.num_key_value_groups = len(heads) // len(kv)
        else:
            idx = torch.tensor(v.kept, dtype=torch.long)
            for n in ("mlp.gate", "mlp.up"):
                w, b = p[n]
                self._set(lins[n], w[idx], None if b is None else b[idx])
            self._set(lins["mlp.down"], v.weight, None)

    def install(self, levels: list[int]) -> None:
        for u, lv in enumerate(levels):
            self.set(u, lv)

    def restore(self) -> None:
        for u in range(len(self.levels)):
            self.set(u, 0)


class KLFitness:
    """Mean per-token KL(dense || candidate) on the first ``n`` of ``windows`` (module docstring)."""

    def __init__(self, adapter: ModelAdapter, stitcher: Stitcher, windows: torch.Tensor, device: torch.device) -> None:
        self.adapter, self.stitcher, self.device = adapter, stitcher, device
        self.windows = windows
        self.dtype = next(adapter.model.parameters()).dtype
        self.ctx = adapter.context(windows.shape[1], device, self.dtype)
        self.units = 2 * adapter.num_layers
        self.block_passes = 0
        self.evaluations = 0
        self.window_evaluations = 0
        stitcher.restore()
        with torch.no_grad():
            self.dense_logp = [self._logp(self._run(self._embed(w), 0)).half() for w in windows.split(1)]
        self._parent: list[int] | None = None
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._recorded: tuple[tuple[int, ...], dict[int, list[torch.Tensor]]] | None = None
        self.record_windows = windows.shape[0]  # evaluations on this many windows keep their states

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(ids.to(self.device))

    def _run(self, h: torch.Tensor, start: int, record: list[torch.Tensor] | None = None) -> torch.Tensor:
        for b in range(start, self.units):
            if record is not None:
                record.append(h)
            if self.stitcher.removed(b):
                continue
            layer = self.adapter.layers[b // 2]
            self.block_passes += 1
            h = self.adapter.attention_block(layer, h, self.ctx) if b % 2 == 0 else self.adapter.mlp_block(layer, h)
        return h

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.adapter.logits(h[0]).float(), dim=-1)

    def _kl(self, h: torch.Tensor, w: int) -> float:
        logq = self._logp(h)
        logp = self.dense_logp[w].float()
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        value = float(kl)
        if not math.isfinite(value):
            raise NumericalError("NaN/inf logits while scoring a searched allocation; use --dtype float32")
        return value

    @torch.no_grad()
    def set_parent(self, levels: list[int], n: int) -> None:
        """Cache the hidden state entering every block of ``levels`` on the first ``n`` windows
        (taken from the last ``n``-window evaluation when it was of ``levels``: no extra pass)."""
        if self._recorded is not None and self._recorded[0] == tuple(levels) and len(self._recorded[1]) >= n:
            self._parent, self._cache = list(levels), self._recorded[1]
            self._recorded = None
            return
        self.stitcher.install(levels)
        self._parent = list(levels)
        self._cache = {}
        for w in range(n):
            rec: list[torch.Tensor] = []
            self._run(self._embed(self.windows[w : w + 1]), 0, rec)
            self._cache[w] = rec

    @torch.no_grad()
    def __call__(self, levels: list[int], n: int) -> float:
        """Mean KL over the first ``n`` windows (each window weighs the same)."""
        self.stitcher.install(levels)
        start = 0
        if self._parent is not None:
            diff = [u for u in range(self.units) if levels[u] != self._parent[u]]
            start = diff[0] if diff else self.units
        total = 0.0
        record = n >= self.record_windows
        recorded: dict[int, list[torch.Tensor]] = {}
        for w in range(n):
            if w in self._cache and start < self.units:
                rec = self._cache[w][:start] if record else None
                h = self._run(self._cache[w][start], start, rec)
            elif w in self._cache:
                rec = self._cache[w] if record else None
                h = self._final(w)
            else:
                rec = [] if record else None
                h = self._run(self._embed(self.windows[w : w + 1]), 0, rec)
            if rec is not None:
                recorded[w] = rec
            total += self._kl(h, w)
        if record:
            self._recorded = (tuple(levels), recorded)  # becomes the cache if this is the next parent
        self.evaluations += 1
        self.window_evaluations += n
        return total / n

    def _final(self, w: int) -> torch.Tensor:
        """The parent's output on window ``w``: run its last block from the cache."""
        return self._run(self._cache[w][self.units - 1], self.units - 1)
