"""The teacher's side of distillation: its targets per micro-batch (final hidden states and head, or
top-k log-probabilities) and the cache that spares its forward on windows read again."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from slimgpt.recovery.data import Example, collate
from slimgpt.recovery.losses import IGNORE, TeacherTargets, teacher_topk
from slimgpt.recovery.split import hidden_states, scored_rows, split_model


class TopkCache:
    """Teacher top-k targets of the windows that will be read again (each is computed once): with
    scarce text a long run reads every window many times, and the teacher forward is then skipped on
    all but the first. Entries are dropped after their last use; memory is k × 8 bytes per token."""

    def __init__(self, uses: Counter[int]) -> None:
        self.uses = uses
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def state(self) -> dict[str, Any]:
        return {"uses": dict(self.uses), "store": self.store}

    def load(self, state: dict[str, Any]) -> None:
        self.uses = Counter(state["uses"])
        self.store = state["store"]


class Teacher:
    """The teacher in eval mode, no gradients, in the compute dtype; makes :class:`TeacherTargets`."""

    def __init__(self, model: nn.Module, topk: int | None, temperature: float, chunk: int,
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.split = split_model(self.model)
        self.topk, self.temperature, self.chunk, self.autocast = topk, temperature, chunk, autocast
        self.cache: TopkCache | None = None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.split.head(h, self.split.weight)

    @torch.no_grad()
    def _rows(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        with self.autocast():
            return scored_rows(hidden_states(self.split, batch, device), batch["labels"])

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor], device: torch.device,
                examples: list[int] | None = None, items: list[Example] | None = None,
                pad_id: int = 0) -> TeacherTargets:
        """Targets of ``batch``; with a top-k cache and the batch's window indices, windows read
        again later are computed once."""
        if self.topk is None or self.cache is None or examples is None or items is None:
            return TeacherTargets(hidden=self._rows(batch, device), head=self._head, topk=self.topk)
        missing = [i for i, e in enumerate(examples) if e not in self.cache.store]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            sub = collate([items[i] for i in missing], pad_id)
            logp, ids = self._topk_rows(self._rows(sub, device))
            counts = (sub["labels"][:, 1:] != IGNORE).sum(1).tolist()
            for i, part_p, part_i in zip(missing, logp.split(counts), ids.split(counts)):
                fresh[examples[i]] = (part_p, part_i)
        parts = []
        for e in examples:
            entry = fresh.get(e) or self.cache.store[e]
            parts.append(entry)
            self.cache.uses[e] -= 1
            if self.cache.uses[e] > 0:
                self.cache.store[e] = (entry[0].cpu(), entry[1].cpu())
            else:
                self.cache.store.pop(e, None)
        logp = torch.cat([p.to(device) for p, _ in parts])
        ids = torch.cat([i.to(device) for _, i in parts])
        return TeacherTargets(topk_logp=logp, topk_ids=ids)

    def _topk_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ps, ids = [], []
        for r0 in range(0, rows.shape[0], self.chunk):
            logp, idx = teacher_topk(self._head(rows[r0:r0 + self.chunk]).float(), self.topk or 1, self.temperature)
            ps.append(logp)
            ids.append(idx.to(torch.int32))
        if not ps:
            k = self.topk or 1
            return rows.new_zeros((0, k + 1), dtype=torch.float32), torch.zeros((0, k), dtype=torch.int32)
        return torch.cat(ps), torch.cat(ids)


__all__ = ["Teacher", "TopkCache"]
