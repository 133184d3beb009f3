"""The training loop of recovery: distillation or LM loss, full-parameter or LoRA, one or many processes.

One optimiser step reads ``batch_size × grad_accum × processes`` windows (the global batch), fixed
in advance by :func:`slimgpt.recovery.data.window_order`; every micro-batch runs the teacher (no
gradients, eval mode, in the compute dtype), then the student's decoder, then the chunked head loss
(:mod:`slimgpt.recovery.losses`), then backward. The loss is divided by the scored tokens of the
whole global batch (counted before the step and summed over processes), so micro-batching and data
parallelism change nothing but the order of float sums. AdamW (fused where the device allows) with
a linear warm-up and a cosine decay to zero; gradients clipped to ``max_grad_norm``; bf16 autocast
on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), the weights and the optimiser in fp32.

Why data parallelism is a gradient all-reduce here rather than ``DistributedDataParallel``: the
loss applies the head weight outside the module's ``forward`` (the chunked loss), and accumulation
is explicit, so one summed all-reduce of the gradients after the last micro-batch (what DDP does,
without its hooks) is exact and needs no ``no_sync`` bookkeeping. Every rank holds the same
weights and optimiser state; only rank 0 evaluates, checkpoints, prints and saves.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimgpt import distributed
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.recovery.checkpoint import RunCheckpoint, restore_rng, rng_snapshot
from slimgpt.recovery.config import RecoveryConfig
from slimgpt.recovery.data import TrainData, collate, scored_tokens, window_order
from slimgpt.recovery.evaluation import evaluate
from slimgpt.recovery.lora import is_peft
from slimgpt.recovery.losses import IGNORE, chunked_head_loss
from slimgpt.recovery.memory import keep_freed_memory
from slimgpt.recovery.plan import Plan, lr_at
from slimgpt.recovery.split import hidden_states, scored_rows, split_model
from slimgpt.recovery.teacher import Teacher, TopkCache

log = logging.getLogger(__name__)


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time so far (this run and the runs it resumes)
    time: dict[str, float] = field(default_factory=Counter)  # type: ignore[assignment]


class Trainer:
    """Trains ``model`` in place over ``data`` by ``plan`` (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: RecoveryConfig, plan: Plan, data: TrainData, pad_id: int,
                 device: torch.device, teacher: nn.Module | None = None, ckpt: RunCheckpoint | None = None,
                 progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model, self.cfg, self.plan, self.data, self.pad_id, self.device = model, cfg, plan, data, pad_id, device
        self.ckpt, self.progress, self.on_step = ckpt, progress and distributed.is_main(), on_step
        if device.type == "cpu":
            keep_freed_memory()
        bf16 = plan.dtype == "bfloat16"
        self.autocast: Callable[[], AbstractContextManager] = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext)
        self.teacher = None
        if teacher is not None:
            self.teacher = Teacher(teacher, cfg.teacher_topk, cfg.temperature, plan.chunk, self.autocast)
        self.split = split_model(model)
        self.params = [p for p in model.parameters() if p.requires_grad and p.numel() > 0]
        for p in model.parameters():
            if p.numel() == 0:
                p.requires_grad_(False)  # a removed block's empty tensors: nothing to train
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.opt = _adamw(self.params, plan.lr, cfg.weight_decay)
        self.order = window_order(data, plan.steps * plan.global_batch, cfg.seed)
        if self.teacher is not None and cfg.teacher_topk is not None:
            self.teacher.cache = TopkCache(Counter(self._my_windows()))
        self.state = RunState()
        self.rng = rng_snapshot()

    # -- which windows --------------------------------------------------------------------------

    def micro_windows(self, step: int, micro: int) -> list[int]:
        """Windows of micro-batch ``micro`` of step ``step`` (1-based) on this rank."""
        p = self.plan
        base = (step - 1) * p.global_batch + micro * p.batch_size * p.world + distributed.rank() * p.batch_size
        return self.order[base:base + p.batch_size]

    def _my_windows(self) -> Iterator[int]:
        for step in range(1, self.plan.steps + 1):
            for m in range(self.plan.grad_accum):
                yield from self.micro_windows(step, m)

    # -- checkpoints ----------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach() for p in self.params}

    def save(self) -> None:
        if self.ckpt is None or not distributed.is_main():
            return
        t0 = time.perf_counter()
        extra = {"optimizer": self.opt.state_dict(), "rng": self.rng,
                 "cache": self.teacher.cache.state() if self.teacher and self.teacher.cache else None}
        info = {"tokens": self.state.tokens, "history": self.state.history, "seconds": self.state.seconds,
                "time": dict(self.state.time)}
        self.ckpt.save(self.state.step, self.trainable_state(), extra, info)
        self.saved_step = self.state.step
        self.state.time["checkpoint_s"] += time.perf_counter() - t0

    def restore(self) -> None:
        """Continue from the committed checkpoint (every rank reads the same files)."""
        assert self.ckpt is not None and self.ckpt.state is not None
        saved = self.ckpt.load_step()
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved["weights"].items():
                named[name].copy_(tensor)
        self.opt.load_state_dict(saved["optimizer"])
        self.rng = saved["rng"]
        restore_rng(self.rng)
        st = self.ckpt.state
        if self.teacher is not None and self.teacher.cache is not None:
            if saved.get("cache") is not None and not distributed.is_distributed():
                self.teacher.cache.load(saved["cache"])
            else:  # rank 0 saved its own windows' cache: other ranks start theirs again (same values)
                done = st["step"] * self.plan.grad_accum * self.plan.batch_size
                self.teacher.cache.uses = Counter(list(self._my_windows())[done:])
        self.state = RunState(st["step"], st["tokens"], st["history"], st.get("seconds", 0.0),
                              Counter(st.get("time", {})))
        log.info("resuming at step %d of %d (%d tokens seen)", st["step"] + 1, self.plan.steps, st["tokens"])

    # -- one step ---------------------------------------------------------------------------------

    def _batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], list[int]]:
        idx = self.micro_windows(step, micro)
        return collate([self.data.examples[i] for i in idx], self.pad_id), idx

    def train_step(self, step: int, bar: Any) -> dict[str, Any]:
        p, dev = self.plan, self.device
        batches = [self._batch(step, m) for m in range(p.grad_accum)]
        mine = sum(scored_tokens(b) for b, _ in batches)
        seen = sum(int(b["attention_mask"].sum()) for b, _ in batches)
        counts = distributed.all_reduce_sum(torch.tensor([mine, seen], dtype=torch.int64), "the token count")
        n_scored, n_seen = int(counts[0]), int(counts[1])
        scale = 1.0 / max(n_scored, 1)
        sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, nll (summed, unscaled)
        for batch, idx in batches:
            t0 = time.perf_counter()
            targets = None
            if self.teacher is not None:
                targets = self.teacher.targets(batch, dev, idx, [self.data.examples[i] for i in idx], self.pad_id)
            t1 = time.perf_counter()
            with self.autocast():
                rows = scored_rows(hidden_states(self.split, batch, dev), batch["labels"])
                labels = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE].to(dev)
                parts = chunked_head_loss(rows, self.split.weight, labels, self.split.head, teacher=targets,
                                          temperature=self.cfg.temperature, lm_weight=self.cfg.lm_weight,
                                          scale=scale, chunk=p.chunk)
            parts.loss.backward()
            t2 = time.perf_counter()
            sums += torch.tensor([float(parts.loss.detach()) / scale, parts.kl_sum, parts.nll_sum], dtype=torch.float64)
            self.state.time["teacher_s"] += t1 - t0
            self.state.time["student_s"] += t2 - t1
            if bar is not None:
                bar.update(1)
        t0 = time.perf_counter()
        self._all_reduce_grads()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        lr = lr_at(step, p)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.time["optimizer_s"] += time.perf_counter() - t0
        sums = distributed.all_reduce_sum(sums, "the step's loss")
        loss = float(sums[0]) / max(n_scored, 1)
        if not math.isfinite(loss):
            raise NumericalError(f"training loss became {loss} at step {step}; lower --lr")
        entry: dict[str, Any] = {"step": step, "loss": loss, "lr": lr_at(step + 1, p) if step < p.steps else 0.0,
                                 "lr_used": lr, "tokens": self.state.tokens + n_seen, "scored": n_scored}
        if self.teacher is not None:
            entry["kl"] = float(sums[1]) / max(n_scored, 1)
        if self.teacher is None or self.cfg.temperature == 1.0 or self.cfg.lm_weight > 0:
            entry["nll"] = float(sums[2]) / max(n_scored, 1)
        return entry

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over processes, in buckets of at most 32M floats."""
        if not distributed.is_distributed():
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in [*self.params, None]:
            if p is not None and p.grad is not None:
                bucket.append(p.grad)
                size += p.grad.numel()
            if bucket and (p is None or size >= 32 << 20):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                distributed.all_reduce_sum(flat, "the gradient all-reduce")
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, size = [], 0

    # -- the run ----------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        out = evaluate(self.model, self.data.val, self.pad_id, self.device, self.cfg.eval_batch_size, self.teacher,
                       self.autocast, self.plan.chunk)
        self.state.time["eval_s"] += time.perf_counter() - t0
        return out

    def speed_probe(self) -> dict[str, float]:
        """Forward-only tokens/s of the student (no gradients) on the first micro-batch, beside which
        the training tokens/s (teacher + student forward + backward + optimiser) is judged."""
        batch, _ = self._batch(1, 0)
        split = self.split
        was = self.model.training
        self.model.eval()
        times = []
        with torch.no_grad(), self.autocast():
            for _ in range(2):  # the first one warms up
                t0 = time.perf_counter()
                h = hidden_states(split, batch, self.device)
                split.head(h, split.weight)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
        self.model.train(was)
        tokens = int(batch["attention_mask"].sum())
        return {"forward_tok_s": tokens / times[-1], "probe_tokens": tokens}

    def run(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        p = self.plan
        self.saved_step = self.state.step
        main = distributed.is_main()
        if self.state.step == 0 and self.data.val and main:
            entry = {"step": 0, "tokens": 0, **self.evaluate()}
            self.state.history.append(entry)
            log.info("step 0: held-out %s", _fmt(entry))
        self.speed = self.speed_probe() if main else {}
        if self.cfg.grad_checkpointing:
            _checkpointing(self.model, True)
        self.model.train()
        bar = tqdm(total=p.steps * p.grad_accum, initial=self.state.step * p.grad_accum, unit="batch",
                   desc="slimgpt: recovery", disable=not self.progress, dynamic_ncols=True) if self.progress else None
        every_kind, every = p.save_every
        last_save = time.perf_counter()
        try:
            for step in range(self.state.step + 1, p.steps + 1):
                t0 = time.perf_counter()
                entry = self.train_step(step, bar)
                self.state.step, self.state.tokens = step, entry["tokens"]
                self.rng = rng_snapshot()
                self.state.seconds += time.perf_counter() - t0
                entry["seconds"] = self.state.seconds
                entry["tok_s"] = self.state.tokens / max(self.state.seconds, 1e-9) if self.state.seconds else 0.0
                if self.data.val and main and ((p.eval_every and step % p.eval_every == 0) or step == p.steps):
                    entry.update(self.evaluate())
                    log.debug("step %d: %s", step, _fmt(entry))
                self.state.history.append(entry)
                if bar is not None:
                    bar.set_postfix_str(_fmt(entry, short=True), refresh=False)
                if self.on_step is not None:
                    self.on_step(entry)
                due = (every_kind == "steps" and step % int(every) == 0) or (
                    every_kind == "seconds" and time.perf_counter() - last_save >= every)
                if due and step < p.steps:
                    self.save()
                    last_save = time.perf_counter()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
                bar = None
            if self.ckpt is not None and main and every_kind != "off" and self.state.step > self.saved_step:
                self.save()
            if self.ckpt is not None and self.saved_step > 0:
                log.warning("interrupted: step %d of %d is checkpointed in %s; the same command with --resume "
                            "continues", self.saved_step, p.steps, self.ckpt.folder)
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.cfg.grad_checkpointing:
                _checkpointing(self.model, False)
        self.model.eval()
        return self.state.history


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of the decoder layers, non-reentrant; transformers 5 renamed
    ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old names warn)."""
    base = model.get_base_model() if is_peft(model) else model  # type: ignore[operator]
    if on:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where the device has one (CUDA; CPU since torch 2.4), else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _fmt(entry: dict[str, Any], short: bool = False) -> str:
    keys = ("loss", "kl", "eval_ppl", "eval_kl", "tok_s") if short else ("eval_nll", "eval_ppl", "eval_kl")
    parts = []
    for k in keys:
        if k in entry:
            v = entry[k]
            parts.append(f"{k.replace('_s', '/s') if k == 'tok_s' else k} {v:.4g}" if k != "tok_s" else f"tok/s {v:.0f}")
    return ", ".join(parts)


__all__ = ["RunState", "Trainer"]
