"""``recover()``: load the student (a pruned folder), the teacher and the data, train, save.

The output is what went in, recovered: a pruned folder stays a pruned folder of the same shapes
and config type (``slimgpt eval`` / ``report`` / ``export`` read it as any other, its
``slimgpt.json`` keeps the pruning record and adds a ``finetune`` section and the step history);
LoRA without ``--merge`` writes the adapter folder instead. Written atomically, by rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt import distributed
from slimgpt.errors import ConfigError, DataError, ModelError
from slimgpt.recovery.checkpoint import RunCheckpoint
from slimgpt.recovery.config import RecoveryConfig, compute_dtype
from slimgpt.recovery.data import (
    TEACHER,
    Example,
    TrainData,
    build_examples,
    check_source,
    parse_sources,
    repeat_warning,
    sample_teacher,
    sampling_batch,
    teacher_share,
    teacher_windows_needed,
)
from slimgpt.recovery.loop import Trainer
from slimgpt.recovery.lora import add_lora, is_peft, lora_targets, merge_lora
from slimgpt.recovery.plan import CPU_VAL, GPU_VAL, plan_dict, resolve_plan

log = logging.getLogger(__name__)

_NOT_SETTINGS = ("out", "overwrite", "resume", "save_every", "eval_every", "eval_batch_size", "data_dir")


@dataclass
class RecoveryResult:
    model: Any  # the trained model: a PeftModel (adapters not merged), or the plain model
    tokenizer: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


# ---- models -----------------------------------------------------------------------------------------


def source_metadata(path: str) -> dict[str, Any]:
    """The pruned folder's ``slimgpt.json`` (empty for any other model)."""
    meta = Path(path).expanduser() / "slimgpt.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        data.pop("format_version", None)
        return data
    return {}


def resolve_teacher(teacher: str, student: str) -> str:
    """``auto`` → the model the pruned folder was made from (``config.model`` in its slimgpt.json):
    a zoo name, a hub id, or a folder (taken as given, else relative to the pruned folder's parent)."""
    if teacher != "auto":
        return teacher
    name = source_metadata(student).get("config", {}).get("model")
    if not name:
        raise ConfigError(f"--teacher auto needs the source model recorded in {student}/slimgpt.json (a folder "
                          "written by slimgpt prune); give --teacher MODEL")
    from slimgpt.zoo import ZOO

    if name in ZOO or Path(name).expanduser().is_dir():
        return name
    beside = Path(student).expanduser().resolve().parent / name
    return str(beside) if beside.is_dir() else name


def drop_gguf_quantizer(model: Any) -> None:
    """Zoo models were dequantised from GGUF to floats, but their config still names the GGUF
    quantizer, which transformers attaches on load and which makes ``save_pretrained`` refuse to
    write. The weights are plain tensors: detach it, as :func:`slimgpt.zoo.convert` does."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        model.hf_quantizer = None


# ---- data -------------------------------------------------------------------------------------------


def _val_count(cfg: RecoveryConfig, n: int, device: torch.device) -> int:
    if cfg.val_size is not None:
        return cfg.val_size
    if cfg.eval_data or n < 10:
        return 0
    return min(CPU_VAL if device.type != "cuda" else GPU_VAL, n // 10)


def load_data(cfg: RecoveryConfig, tokenizer: Any, device: torch.device) -> tuple[TrainData, list[Any]]:
    """Real sources packed into windows, the held-out split, and the (unsampled) teacher share."""
    specs = parse_sources(cfg.data)
    examples: list[Example] = []
    spans: list[tuple[int, int]] = []
    infos: list[dict[str, Any]] = []
    val: list[Example] = []
    eval_info: dict[str, Any] = {}
    for spec in specs:
        if spec.name == TEACHER:
            infos.append({"name": TEACHER})
            spans.append((len(examples), len(examples)))
            continue
        windows, info = build_examples(spec.name, tokenizer, cfg.seqlen, cfg.data_dir)
        if not val and not eval_info and not cfg.eval_data:  # held out from the first real source
            order = list(range(len(windows)))
            random.Random(cfg.seed).shuffle(order)
            n_val = _val_count(cfg, len(windows), device)
            if n_val >= len(windows):
                raise DataError(f"--val-size {n_val} leaves no training examples of '{spec.name}' out of "
                                f"{len(windows)}; lower it")
            val = [windows[i] for i in order[:n_val]]
            windows = [windows[i] for i in order[n_val:]]
            if val:
                eval_info = {"source": f"split of --data {spec.name}", "held_out": len(val)}
        if cfg.max_train_samples is not None:
            windows = windows[:cfg.max_train_samples]
        spans.append((len(examples), len(examples) + len(windows)))
        examples.extend(windows)
        infos.append({**info, "train_windows": len(windows)})
    if cfg.eval_data:
        val, info = build_examples(cfg.eval_data, tokenizer, cfg.seqlen, cfg.data_dir)
        if cfg.val_size:
            val = val[:cfg.val_size]
        eval_info = {**info, "source": cfg.eval_data, "held_out": len(val)}
    weights = [s.weight for s in specs]
    data = TrainData(examples, spans, weights, val, {"names": [s.name for s in specs], "sources": infos,
                                                      "eval": eval_info})
    return data, specs


def add_teacher_windows(data: TrainData, specs: list[Any], teacher: nn.Module | None, tokenizer: Any,
                        cfg: RecoveryConfig, needed: int, device: torch.device, ckpt: RunCheckpoint | None,
                        progress: bool) -> None:
    """Sample the ``teacher`` source's windows (or take them from the checkpoint) and fix the mix's
    weights: without explicit weights, real windows as they come and the teacher as much as all of
    them together."""
    share = teacher_share(specs, len(data.examples))
    if share == 0:
        return
    if teacher is None:
        raise ConfigError("--data teacher samples text from the teacher; give --teacher")
    n = teacher_windows_needed(share, needed, cfg.teacher_tokens, cfg.seqlen)
    n_val = _val_count(cfg, 10 * n, device) if not data.val and not cfg.eval_data else 0
    pool = ckpt.load_pool() if ckpt is not None and cfg.resume else None
    t0 = time.perf_counter()
    if pool is None:
        def sample() -> dict[str, Any]:
            batch = sampling_batch(teacher.config, cfg.seqlen, next(teacher.parameters()).dtype, device)
            rows = sample_teacher(teacher, tokenizer, n + n_val, cfg.seqlen, cfg.seed, device, batch, progress)
            return {"ids": torch.tensor([r.input_ids for r in rows], dtype=torch.long)}

        pool = distributed.agree(sample, "sampling text from the teacher")
        if ckpt is not None and distributed.is_main():
            ckpt.save_pool(pool)
    rows = [Example(r, list(r)) for r in pool["ids"].tolist()]
    seconds = time.perf_counter() - t0
    at = specs.index(next(s for s in specs if s.name == TEACHER))
    start = len(data.examples)
    data.examples.extend(rows[:n])
    data.spans[at] = (start, start + n)
    if n_val:
        data.val = rows[n:]
        data.info["eval"] = {"source": "sampled from the teacher", "held_out": n_val}
    if all(w is None for w in data.weights):
        real = sum(b - a for (a, b), s in zip(data.spans, specs) if s.name != TEACHER)
        data.weights = [float(real or 1) if s.name == TEACHER else float(b - a) for (a, b), s in zip(data.spans, specs)]
    data.info["sources"][at] = {"name": TEACHER, "windows": n, "tokens": n * cfg.seqlen, "share": share,
                                "sample_s": seconds, "sampling": "temperature 1, full distribution, from BOS/EOS"}


# ---- the run ----------------------------------------------------------------------------------------


def run_settings(cfg: RecoveryConfig, plan: dict[str, Any], model_path: str) -> dict[str, Any]:
    """What decides the weights (for refusing a ``--resume`` with other settings)."""
    s = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}
    s["plan"] = {k: v for k, v in plan.items() if k not in ("save_every", "eval_every")}
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        s["model_files"] = {f.name: f.stat().st_size for f in sorted(folder.glob("*.safetensors"))}
    return s


def recover(cfg: RecoveryConfig, model: Any = None, tokenizer: Any = None, progress: bool = True,
            on_step: Callable[[dict[str, Any]], None] | None = None, teacher_model: Any = None) -> RecoveryResult:
    """Recover ``cfg.model`` (or the given model) on ``cfg.data``: distillation from ``cfg.teacher``
    or the LM loss, full-parameter or LoRA; save to ``cfg.out`` if set (see the module docstring)."""
    from slimgpt.utils import resolve_device, seed_everything

    cfg.validate()
    specs = parse_sources(cfg.data)
    for spec in specs:
        check_source(spec.name)
    if all(s.name == TEACHER for s in specs) and cfg.max_tokens is None and cfg.max_steps is None:
        raise ConfigError("--data teacher alone has no size: give --max-tokens (or --max-steps)")
    if any(s.name == TEACHER for s in specs) and cfg.teacher is None:
        raise ConfigError("--data teacher samples text from the teacher; give --teacher")
    teacher_name = resolve_teacher(cfg.teacher, cfg.model) if cfg.teacher is not None and teacher_model is None else None
    if cfg.eval_data is not None:
        check_source(cfg.eval_data)
    out_path = Path(cfg.out).expanduser().resolve() if cfg.out is not None else None
    if out_path is not None and out_path.exists() and not cfg.overwrite:
        raise ConfigError(f"output {out_path} exists; pass --overwrite or choose another")
    if cfg.resume and cfg.out is None:
        raise ConfigError("--resume continues the run of an --out folder; give --out")
    device = distributed.init(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    save_as = None  # a model passed in is saved as it is
    if model is None:
        from slimgpt.io import save_dtype, source_dtype
        from slimgpt.zoo import load_model

        model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=device)
        # trained in float32 (master weights), written back in the folder's own 16-bit dtype
        save_as = save_dtype("auto", source_dtype(cfg.model), torch.float32)
    if tokenizer is None:
        raise ModelError(f"{cfg.model} has no tokenizer; save one into the model folder")
    drop_gguf_quantizer(model)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dtype = compute_dtype(cfg.dtype, device)

    teacher = teacher_model
    if teacher_name is not None:
        from slimgpt.zoo import load_model

        teacher, _ = load_model(teacher_name, dtype=dtype, device=device)
        drop_gguf_quantizer(teacher)
    if teacher is not None:
        teacher.to(device=device, dtype=dtype)
        if teacher.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
            raise ModelError("the teacher's vocabulary differs from the student's; distil from the model the student "
                             "was pruned from (--teacher auto)")

    data, specs = load_data(cfg, tokenizer, device)
    share = teacher_share(specs, len(data.examples))
    real = len(data.examples)
    window_tokens = (sum(len(e.input_ids) for e in data.examples) / real) if real else float(cfg.seqlen)
    vocab = model.get_output_embeddings().weight.shape[0]
    plan = resolve_plan(cfg, device, math.ceil(real / (1 - share)) if share < 1 else 0, window_tokens, vocab)
    settings = run_settings(cfg, plan_dict(plan), cfg.model)
    ckpt = RunCheckpoint(cfg.out, settings) if cfg.out is not None and plan.save_every[0] != "off" else None
    if ckpt is None and cfg.out is not None and cfg.resume:
        raise ConfigError("--resume needs checkpoints; drop --save-every 0")
    if ckpt is not None:
        if distributed.is_main():
            ckpt.open(cfg.resume)
        ckpt.state = distributed.broadcast_object(ckpt.state, what="the checkpoint state")
    add_teacher_windows(data, specs, teacher, tokenizer, cfg, plan.steps * plan.global_batch, device, ckpt, progress)
    if not data.examples:
        raise DataError(f"--data {cfg.data} gave no training windows")
    warning = repeat_warning(plan.steps * plan.global_batch, data)
    if warning and distributed.is_main():
        log.warning(warning)

    targets = 0
    if plan.lora:
        targets = len(lora_targets(model))
        model = add_lora(model, cfg)
        if Path(cfg.model).expanduser().is_dir():  # adapter_config.json must find the base from anywhere
            for adapter_config in model.peft_config.values():
                adapter_config.base_model_name_or_path = str(Path(cfg.model).expanduser().resolve())
    trainer = Trainer(model, cfg, plan, data, pad_id, device, teacher, ckpt, progress, on_step)
    if ckpt is not None and ckpt.state is not None:
        trainer.restore()
    log.info("recovery: %s, %s, %d steps of %d windows (%d x %d accumulated x %d processes) = %.0f tokens each, "
             "%.0f tokens in all, lr %.2g, %s", "distillation" if teacher is not None else "LM loss",
             "LoRA" if plan.lora else "full-parameter", plan.steps, plan.global_batch, plan.batch_size,
             plan.grad_accum, plan.world, plan.tokens_per_step, plan.steps * plan.tokens_per_step, plan.lr, plan.dtype)
    history = trainer.run()
    trainable = sum(p.numel() for p in trainer.params)
    st = trainer.state
    train_s = st.seconds
    speed = {**getattr(trainer, "speed", {}), "train_tok_s": st.tokens / train_s if train_s else None}
    report = {
        "finetune": {
            "config": {**asdict(cfg), "teacher_resolved": teacher_name, "grad_accum": plan.grad_accum,
                       "batch_size": plan.batch_size, "effective_batch": plan.global_batch,
                       "max_steps": cfg.max_steps},
            "plan": plan_dict(plan), "loss": _loss_name(cfg, teacher is not None),
            "data": data.info["sources"], "eval": data.info["eval"], "train_windows": len(data.examples),
            "lora_targets": targets, "trainable_params": trainable, "tokens": st.tokens, "steps": st.step,
            "time_s": time.perf_counter() - t_start, "train_s": train_s,
            "time_split_s": {k: round(v, 3) for k, v in st.time.items()}, "speed": speed, "device": str(device),
            "processes": plan.world,
            "first_loss": next((h["loss"] for h in history if "loss" in h), None),
            "last_loss": history[-1].get("loss") if history else None,
            "loss_means": loss_means(history),
            "eval_loss": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
            "evals": [{k: h[k] for k in ("step", "tokens", "eval_nll", "eval_ppl", "eval_kl") if k in h}
                     for h in history if "eval_nll" in h],
            "warning": warning,
        },
    }
    result_model: Any = model
    if plan.lora and cfg.merge:
        result_model = merge_lora(model)
    out = None
    if cfg.out is not None:
        meta = {**source_metadata(cfg.model), **report, "finetune_history": history}
        out = distributed.agree(lambda: save_recovered(result_model, tokenizer, cfg.out, meta, cfg.overwrite, save_as),
                                "saving the recovered model")
        if ckpt is not None and distributed.is_main():
            ckpt.discard()
    return RecoveryResult(result_model, tokenizer, history, report, out)


def loss_means(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted training loss over the first and the last tenth of the steps (at least one) and
    over the whole run: what a reader can compare, unlike two single steps' losses."""
    steps = [h for h in history if "loss" in h]
    n = max(1, math.ceil(len(steps) / 10))

    def mean(part: list[dict[str, Any]]) -> float | None:
        weight = sum(h.get("scored", 1) for h in part)
        return sum(h["loss"] * h.get("scored", 1) for h in part) / weight if weight else None

    return {"window_steps": n, "first": mean(steps[:n]), "last": mean(steps[-n:]), "run": mean(steps)}


def _loss_name(cfg: RecoveryConfig, teacher: bool) -> str:
    if not teacher:
        return "LM (next-token cross-entropy)"
    kd = f"T²·KL(teacher ‖ student) at T={cfg.temperature:g}" + (f", teacher top-{cfg.teacher_topk}"
                                                                   if cfg.teacher_topk else "")
    return kd if cfg.lm_weight == 0 else f"{1 - cfg.lm_weight:g}·{kd} + {cfg.lm_weight:g}·LM"


def save_recovered(model: Any, tokenizer: Any, out: str | Path, metadata: dict[str, Any],
                   overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Adapters (a PeftModel) → adapter folder (+ tokenizer, ``slimgpt_finetune.json``); a slim model
    → a pruned-model folder (:func:`slimgpt.io.save_pruned`); a stock model → ``save_pretrained``.
    Atomic in every case; a model's weights in ``dtype`` when given (adapters stay as trained)."""
    if is_peft(model):
        return _save_folder(model, tokenizer, out, overwrite, "slimgpt_finetune.json", metadata)
    drop_gguf_quantizer(model)
    if dtype is not None:
        metadata = {**metadata, "saved_dtype": str(dtype).removeprefix("torch.")}
    if model.config.model_type.startswith("slimgpt_"):
        from slimgpt.io import save_pruned

        return save_pruned(model, tokenizer, out, metadata, overwrite=overwrite, dtype=dtype)
    return _save_folder(model, tokenizer, out, overwrite, "slimgpt.json", metadata, dtype)


def _save_folder(model: Any, tokenizer: Any, out: str | Path, overwrite: bool, meta_name: str,
                 metadata: dict[str, Any], dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` of model and tokenizer plus a metadata JSON, written atomically."""
    from slimgpt.io import atomic_path, cast_saved_weights

    with atomic_path(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if dtype is not None:
            cast_saved_weights(tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / meta_name).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return Path(out).expanduser().resolve()


__all__ = ["RecoveryResult", "drop_gguf_quantizer", "load_data", "recover", "resolve_teacher", "save_recovered",
           "source_metadata"]
