"""Recovery's settings: every knob of a run (:class:`RecoveryConfig`) and its checks, made before any
model or text is read, and the compute dtype a device gets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt.errors import ConfigError


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


__all__ = ["RecoveryConfig", "compute_dtype", "native_bf16", "parse_interval"]
