"""What a recovery run's ``None`` settings stand for on this device and data (:class:`Plan`), and the
learning-rate schedule (linear warm-up, cosine to zero)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from slimgpt import distributed
from slimgpt.recovery.config import RecoveryConfig, compute_dtype, parse_interval

# CPU: 1,024 tokens per step at seqlen 256 (a step every ~2 s on 2 cores). At a fixed token budget more,
# smaller steps recovered more (SmolLM2 50 %, 100k tokens, WikiText-2 64 windows: 4 x 2 windows per step
# 449, 4 x 1 377, 2 x 1 373 but 20 % slower)
CPU_BATCH, CPU_ACCUM = 4, 1
GPU_BATCH, GPU_ACCUM = 16, 4  # the paper's global batch of 64
LR_FULL, LR_LORA = 3e-4, 2e-3  # best of 1e-4 / 3e-4 / 5e-4 / 1e-3 and 5e-4 / 2e-3 on that run
CPU_VAL, GPU_VAL = 16, 128  # held-out windows


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


def plan_dict(plan: Plan) -> dict[str, Any]:
    d = asdict(plan)
    d["global_batch"] = plan.global_batch
    d["tokens_per_step"] = plan.tokens_per_step
    return d


__all__ = ["CPU_VAL", "GPU_VAL", "Plan", "lr_at", "plan_dict", "resolve_plan"]
