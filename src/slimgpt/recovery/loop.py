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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimgpt import distributed
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.recovery.checkpoint import RunCheckpoint, restore_rng, rng_snapshot
from slimgpt.recovery.data import Example, TrainData, collate, scored_tokens, window_order
from slimgpt.recovery.lora import is_peft
from slimgpt.recovery.losses import IGNORE, TeacherTargets, chunked_head_loss, linear_head, teacher_topk

log = logging.getLogger(__name__)

# CPU: 1,024 tokens per step at seqlen 256 (a step every ~2 s on 2 cores). At a fixed token budget more,
# smaller steps recovered more (SmolLM2 50 %, 100k tokens, WikiText-2 64 windows: 4 x 2 windows per step
# 449, 4 x 1 377, 2 x 1 373 but 20 % slower)
CPU_BATCH, CPU_ACCUM = 4, 1
GPU_BATCH, GPU_ACCUM = 16, 4  # the paper's global batch of 64
LR_FULL, LR_LORA = 3e-4, 2e-3  # best of 1e-4 / 3e-4 / 5e-4 / 1e-3 and 5e-4 / 2e-3 on that run
CPU_VAL, GPU_VAL = 16, 128  # held-out windows


@dataclass
class RecoveryConfig:
    """Every knob of a recovery run; ``None`` means "the default for this device / mode" (resolved
    by :func:`resolve_plan` and recorded in the report)."""

    model: str
    data: str = "c4"
    out: str | None = None
    teacher: str | None = None  # None: LM loss only; "auto": the source model in slimgpt.json
    temperature: float = 1.0
    lm_weight: float = 0.0  # with a teacher: loss = (1 - w) T² KL + w LM
    teacher_topk: int | None = None
    teacher_tokens: int | None = None  # cap on the tokens sampled for --data teacher
    lora: bool | None = None  # None: full-parameter with a teacher, LoRA without
    merge: bool = False
    max_tokens: int | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int | None = None
    grad_accum: int | None = None
    seqlen: int = 256
    lr: float | None = None
    warmup: float = 0.05  # < 1: share of the steps; >= 1: steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    grad_checkpointing: bool = False
    dtype: str = "auto"  # compute dtype: auto | float32 | bfloat16
    max_train_samples: int | None = None
    val_size: int | None = None
    eval_data: str | None = None
    eval_every: int = 0  # 0: up to ten evaluations per run, ~10 % of its time at most (before and after when short)
    eval_batch_size: int = 8
    save_every: str = "10m"  # N steps, or a time such as 600s / 10m / 1h; 0: no checkpoints
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    overwrite: bool = False

    @property
    def uses_lora(self) -> bool:
        return self.lora if self.lora is not None else self.teacher is None

    def validate(self) -> None:
        checks = [
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum is None or self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.seqlen >= 2, f"--seqlen must be at least 2, got {self.seqlen}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.rank >= 1, f"--rank must be at least 1, got {self.rank}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be at least 1, got {self.max_tokens}"),
            (self.max_train_samples is None or self.max_train_samples >= 1,
             f"--max-train-samples must be at least 1, got {self.max_train_samples}"),
            (self.val_size is None or self.val_size >= 0, f"--val-size must be 0 or more, got {self.val_size}"),
            (self.eval_every >= 0, f"--eval-every must be 0 or more, got {self.eval_every}"),
            (self.warmup >= 0, f"--warmup must be 0 or more, got {self.warmup}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (0 <= self.lm_weight <= 1, f"--lm-weight must be in [0, 1], got {self.lm_weight}"),
            (self.teacher_topk is None or self.teacher_topk >= 1, f"--teacher-topk must be at least 1, got {self.teacher_topk}"),
            (self.teacher_tokens is None or self.teacher_tokens >= 1,
             f"--teacher-tokens must be at least 1, got {self.teacher_tokens}"),
            (self.dtype in ("auto", "float32", "bfloat16", "fp32", "bf16"),
             f"--dtype must be auto, float32 or bfloat16, got '{self.dtype}'"),
            (self.teacher is not None or (self.teacher_topk is None and self.lm_weight == 0.0 and self.temperature == 1.0),
             "--teacher-topk, --lm-weight and --temperature need --teacher (without one the loss is the LM loss)"),
            (self.uses_lora or not self.merge, "--merge folds LoRA adapters; full-parameter training saves the model"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_interval(self.save_every)


def parse_interval(text: str) -> tuple[str, float]:
    """``--save-every``: ``("steps", N)``, ``("seconds", S)`` or ``("off", 0)``."""
    t = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
            kind = "seconds"
        else:
            value = float(int(t))
            kind = "steps"
    except ValueError:
        raise ConfigError(f"--save-every must be a number of steps or a time like 600s, 10m, 1h; got '{text}'") from None
    if value < 0:
        raise ConfigError(f"--save-every must be 0 or more, got '{text}'")
    return ("off", 0.0) if value == 0 else (kind, value)


def native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AMX or AVX512-BF16): bf16 autocast is then faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())  # type: ignore[union-attr]
    except AttributeError:
        return False


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it and on CPUs with native bf16, else fp32."""
    if name in ("float32", "fp32"):
        return torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32


@dataclass
class Plan:
    """The resolved settings of a run (what ``None`` stood for), recorded in the report."""

    batch_size: int
    grad_accum: int
    world: int
    steps: int
    warmup_steps: int
    lr: float
    lora: bool
    dtype: str
    eval_every: int
    window_tokens: float
    save_every: tuple[str, float] = ("off", 0.0)
    chunk: int = 256

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def tokens_per_step(self) -> float:
        return self.global_batch * self.window_tokens


def resolve_plan(cfg: RecoveryConfig, device: torch.device, train_windows: int, window_tokens: float,
                 vocab: int) -> Plan:
    """Batch, accumulation, steps, learning rate, evaluation interval for this device and data.

    ``train_windows`` counts the windows one pass over the data reads (for ``--epochs``)."""
    cpu = device.type != "cuda"
    batch = cfg.batch_size or (CPU_BATCH if cpu else GPU_BATCH)
    accum = cfg.grad_accum or (CPU_ACCUM if cpu else GPU_ACCUM)
    world = distributed.world()
    per_step = batch * accum * world
    if cfg.max_steps is not None:
        steps = cfg.max_steps
    elif cfg.max_tokens is not None:
        steps = max(1, math.ceil(cfg.max_tokens / (per_step * window_tokens)))
    else:
        steps = max(1, math.ceil(cfg.epochs * train_windows / per_step))
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    lora = cfg.uses_lora
    lr = cfg.lr if cfg.lr is not None else (LR_LORA if lora else LR_FULL)
    # default: about ten evaluations, but a held-out pass (student and teacher forwards over the val
    # windows) costs about 2 × val window-forwards against 4 × per_step for a step (teacher forward,
    # student forward and backward), so evaluations are kept to ~10 % of the training time: at the
    # CPU defaults (16 val windows, 4 a step) every 20 steps, not every 2 of a 25-step run
    val = cfg.val_size if cfg.val_size is not None else (CPU_VAL if cpu else GPU_VAL)
    floor = math.ceil(10 * 2 * val / (4 * per_step))
    every = cfg.eval_every or (max(steps // 10, floor) if steps >= 10 else 0)
    # rows of the head per chunk: ~12M logits on a CPU (256 rows of SmolLM2's 49k vocabulary: measured
    # fastest of 64 / 128 / 170 / 256 / 512 / 1024 on 2 cores), ~64M on a GPU
    chunk = max(16, (12 << 20 if cpu else 64 << 20) // max(vocab, 1))
    return Plan(batch, accum, world, steps, min(warmup, steps), lr, lora,
                str(compute_dtype(cfg.dtype, device)).removeprefix("torch."), every, window_tokens,
                parse_interval(cfg.save_every), chunk)


def lr_at(step: int, plan: Plan) -> float:
    """Learning rate of optimiser step ``step`` (1-based): linear warm-up, then cosine to zero at
    the last step (the last step's update uses the value for ``step - 1``, as transformers' schedule)."""
    s = step - 1
    if s < plan.warmup_steps:
        return plan.lr * (s + 1) / (plan.warmup_steps + 1)
    span = max(1, plan.steps - plan.warmup_steps)
    return plan.lr * 0.5 * (1.0 + math.cos(math.pi * (s - plan.warmup_steps) / span))


# ---- models ------------------------------------------------------------------------------------------


@dataclass
class Split:
    """A causal LM seen as decoder (hidden states) + head (weight and logit function)."""

    body: nn.Module
    weight: torch.Tensor
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_model(model: nn.Module) -> Split:
    base = model.get_base_model() if is_peft(model) else model  # type: ignore[operator]
    head = base.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ConfigError(f"{type(base).__name__} has no bias-free LM head; recovery supports Llama, Qwen2, Gemma 3")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return Split(base.get_decoder(), head.weight, linear_head(softcap))


def hidden_states(split: Split, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Final (normed) hidden states of a batch; the padding mask is passed only when there is padding
    (an all-ones mask would keep SDPA off its causal fast path)."""
    mask = batch["attention_mask"]
    out = split.body(input_ids=batch["input_ids"].to(device),
                     attention_mask=None if bool(mask.all()) else mask.to(device), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def scored_rows(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden[:, :-1]`` whose next-token label is scored, in row-major order."""
    sel = (labels[:, 1:] != IGNORE).to(hidden.device)
    return hidden[:, :-1][sel]


# ---- the teacher's targets --------------------------------------------------------------------------


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


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, val: list[Example], pad_id: int, device: torch.device, batch_size: int = 8,
             teacher: Teacher | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
             chunk: int = 256) -> dict[str, float]:
    """Held-out token-weighted NLL, perplexity and (with a teacher) KL(teacher ‖ student) at T = 1,
    the distributions the model is used with (model in eval mode: no LoRA dropout)."""
    was_training = model.training
    model.eval()
    split = split_model(model)
    kl = nll = 0.0
    count = 0
    try:
        for start in range(0, len(val), batch_size):
            batch = collate(val[start:start + batch_size], pad_id)
            targets = None
            if teacher is not None:
                targets = TeacherTargets(hidden=teacher._rows(batch, device), head=teacher._head)
            with autocast():
                rows = scored_rows(hidden_states(split, batch, device), batch["labels"])
                labels = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE].to(device)
                parts = chunked_head_loss(rows, split.weight.detach(), labels, split.head, teacher=targets,
                                          temperature=1.0, lm_weight=1.0, chunk=chunk)
            kl += parts.kl_sum
            nll += parts.nll_sum
            count += parts.tokens
    finally:
        model.train(was_training)
    mean = nll / max(count, 1)
    out = {"eval_nll": mean, "eval_loss": mean, "eval_ppl": math.exp(mean) if mean < 700 else math.inf,
           "eval_tokens": count}
    if teacher is not None:
        out["eval_kl"] = kl / max(count, 1)
    return out


# ---- the loop ------------------------------------------------------------------------------------------


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


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 1 GiB for reuse instead of returning them to the system.

    By default a block over 32 MiB is mmap'ed on allocation and unmapped on free, so every logits
    chunk and activation of every micro-batch is faulted in (and zeroed by the kernel) again:
    measured on SmolLM2, 2 cores, a training step ran 1.3x faster with this (the chunked loss 2x).
    The resident memory stays at its peak instead of shrinking between steps, which a training
    process reaches on every step anyway. Linux/glibc only; elsewhere nothing happens."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, ctypes.c_int(1 << 30))  # M_TRIM_THRESHOLD
        libc.mallopt(-3, ctypes.c_int(1 << 30))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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


def plan_dict(plan: Plan) -> dict[str, Any]:
    d = asdict(plan)
    d["global_batch"] = plan.global_batch
    d["tokens_per_step"] = plan.tokens_per_step
    return d


__all__ = ["Plan", "RecoveryConfig", "Teacher", "Trainer", "compute_dtype", "evaluate", "lr_at", "native_bf16",
           "parse_interval", "plan_dict", "resolve_plan", "split_model"]
