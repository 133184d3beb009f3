"""LoRA recovery fine-tuning of a pruned model.

The paper (§4, "Implementation details") recovers pruned models as LLM-Pruner does: LoRA on the
Alpaca data for one epoch, AdamW with initial learning rate 1e-4 and cosine annealing, global
batch 64, sequences truncated to 256 tokens. LLM-Pruner's LoRA settings: rank 8, alpha 16,
dropout 0.05, on every linear projection (q, k, v, o, gate, up, down), prompt tokens of Alpaca
examples masked out of the loss. Those are the defaults here; CPU-sized runs override them
(``max_steps``, ``batch_size``, ``grad_accum``, ``seqlen``, ``lr``, ``rank``, ``max_train_samples``).

Pruned layers have their own shapes and a removed block keeps zero-sized linears
(:mod:`slimgpt.modeling`): LoRA targets exactly the linears with weights, by full module name, so
a layer with 0 heads or 0 channels gets no adapter there (an adapter on an empty matrix would
either crash or add parameters that do nothing).

Why a plain PyTorch loop instead of ``transformers.Trainer``: the loop is ~60 lines, has no
accelerate/datasets plumbing to configure on CPU, weights the loss by *tokens over the whole
effective batch* (gradient accumulation over variable-length Alpaca examples would otherwise
weight short examples more), and evaluation on held-out text at fixed optimiser steps is two
lines. Nothing here needs Trainer's distributed features: the paper's models fit one device with
LoRA, and the default model trains on a laptop CPU.

Data (``data``): an Alpaca JSON/JSONL file (``instruction``/``input``/``output``; prompt masked),
any other text file, record file, named corpus (``c4``, ``wiki``, ``wikitext2``) or hub dataset
``org/name[:config[:split]]`` (documents joined with EOS and cut into ``seqlen``-token chunks,
every token scored). Held-out evaluation uses ``eval_data`` when given, else ``val_size`` examples
split off the training data before training.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt.data.calibration import encode, needs_bos
from slimgpt.data.corpora import format_alpaca, is_hub_dataset, load_documents, read_documents, read_text
from slimgpt.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that are not scored (prompt, padding)
PAPER_BATCH = 64  # the paper's global batch size


@dataclass
class FinetuneConfig:
    """Every knob of a recovery run; defaults are the paper's / LLM-Pruner's."""

    model: str
    data: str
    out: str | None = None
    eval_data: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None  # optimiser steps; overrides epochs
    batch_size: int = 4  # examples per forward (micro-batch)
    grad_accum: int | None = None  # micro-batches per step; default: PAPER_BATCH // batch_size
    seqlen: int = 256
    lr: float = 1e-4
    warmup_steps: int = 0  # the paper states no warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    max_train_samples: int | None = None
    val_size: int | None = None  # default: min(128, 10% of the examples); 0 = no held-out split
    eval_every: int = 0  # optimiser steps between evaluations (0: only before and after)
    eval_batch_size: int = 8
    merge: bool = False
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    overwrite: bool = False

    @property
    def accum(self) -> int:
        return self.grad_accum if self.grad_accum is not None else max(1, PAPER_BATCH // self.batch_size)

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum is None or self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.seqlen >= 2, f"--seqlen must be at least 2, got {self.seqlen}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.rank >= 1, f"--rank must be at least 1, got {self.rank}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.max_train_samples is None or self.max_train_samples >= 1,
             f"--max-train-samples must be at least 1, got {self.max_train_samples}"),
            (self.val_size is None or self.val_size >= 0, f"--val-size must be 0 or more, got {self.val_size}"),
            (self.eval_every >= 0, f"--eval-every must be 0 or more, got {self.eval_every}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {self.warmup_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Example:
    """One training sequence; ``labels[i]`` is the target of position ``i`` (shifted in the loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class FinetuneResult:
    model: Any  # the PeftModel (adapters not merged) or, with merge, the merged plain model
    tokenizer: Any
    history: list[dict[str, float]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


# ---- data ------------------------------------------------------------------------------------------


def _raw_records(source: str, data_dir: str | None) -> tuple[list[Any], dict[str, Any]] | None:
    """Records as stored (dicts kept), for JSON/JSONL files and hub datasets; None for text."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        read_documents(path)  # validates the file with one-line DataErrors
        text = read_text(path)
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.split("\n") if line.strip()]
        else:
            data = json.loads(text)
            records = data["data"] if isinstance(data, dict) else data
        return records, {"source": str(path)}
    if not path.exists() and is_hub_dataset(source):
        from slimgpt.data.corpora import _load_hub

        name, _, rest = source.partition(":")
        config, _, split = rest.partition(":")
        ds = _load_hub(name, config or None, split or "train", "give a local .json/.jsonl/.txt file instead")
        return list(ds), {"source": f"hub:{source}"}
    return None


def check_source(source: str) -> None:
    """Fail before the model loads when ``source`` cannot be data (a missing file, usually)."""
    from slimgpt.data.corpora import NAMED_SOURCES

    if source in NAMED_SOURCES or Path(source).expanduser().exists() or is_hub_dataset(source):
        return
    raise DataError(f"data '{source}' is not an existing file, not one of {', '.join(NAMED_SOURCES)}, "
                    "and not a hub dataset like org/name[:config:split]")


def _is_alpaca(records: Sequence[Any]) -> bool:
    return bool(records) and all(
        isinstance(r, dict) and "text" not in r and ("instruction" in r or "output" in r) for r in records
    )


def alpaca_examples(records: Sequence[dict], tokenizer: Any, seqlen: int) -> list[Example]:
    """Alpaca records → examples with the prompt masked out of the loss (LLM-Pruner's
    ``train_on_inputs=False``): ``[BOS] prompt response EOS`` truncated to ``seqlen``; the prompt's
    length is counted by tokenising it alone, as LLM-Pruner does."""
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    pairs = [format_alpaca(r) for r in records]
    prompts = encode(tokenizer, [p for p, _ in pairs])
    fulls = encode(tokenizer, [p + r for p, r in pairs])
    out = []
    for prompt_ids, full_ids in zip(prompts, fulls):
        ids = bos + list(full_ids)
        if eos is not None:
            ids.append(eos)
        ids = ids[:seqlen]
        masked = min(len(bos) + len(prompt_ids), len(ids))
        labels = [IGNORE] * masked + ids[masked:]
        if any(t != IGNORE for t in labels[1:]):  # something left to predict after truncation
            out.append(Example(ids, labels))
    return out


def text_examples(documents: Sequence[str], tokenizer: Any, seqlen: int) -> list[Example]:
    """Documents joined with EOS and cut into non-overlapping ``seqlen``-token chunks (the rest is
    dropped); with the calibration BOS policy (:mod:`slimgpt.data.calibration`)."""
    bos = needs_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(documents), 256):
        for ids in encode(tokenizer, list(documents[start:start + 256])):
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(ids)
    n = len(stream) // body
    if n == 0:
        raise DataError(f"training text has {len(stream)} tokens, need at least --seqlen {seqlen}; "
                        "lower --seqlen or give more text")
    out = []
    for k in range(n):
        ids = ([tokenizer.bos_token_id] if bos else []) + stream[k * body:(k + 1) * body]
        out.append(Example(ids, list(ids)))
    return out


def build_examples(source: str, tokenizer: Any, seqlen: int,
                   data_dir: str | None = None) -> tuple[list[Example], dict[str, Any]]:
    """Training examples of ``source`` and its provenance (see the module docstring)."""
    raw = _raw_records(source, data_dir)
    if raw is not None and _is_alpaca(raw[0]):
        examples = alpaca_examples(raw[0], tokenizer, seqlen)
        info = {**raw[1], "format": "alpaca", "records": len(raw[0]), "prompt_masked": True}
    else:
        if raw is not None and is_hub_dataset(source) and not Path(source).exists():
            from slimgpt.data.corpora import record_text

            docs = [record_text(r, f"{source} record {i}") for i, r in enumerate(raw[0])]
            info = dict(raw[1])
        else:
            docs, info = load_documents(source, data_dir)
        examples = text_examples(docs, tokenizer, seqlen)
        info = {**info, "format": "text", "documents": len(docs), "prompt_masked": False}
    if not examples:
        raise DataError(f"'{source}' gave no training examples (all responses cut off at --seqlen {seqlen}?); "
                        "raise --seqlen or check the records")
    info["examples"] = len(examples)
    return examples, info


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked and not scored."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def scored_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def summed_nll(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum over scored positions of -log p(label); the caller divides by the token count of the
    whole effective batch (so every token weighs the same, whatever its example's length)."""
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
                  batch_size: int = 8) -> float:
    """Token-weighted mean NLL over ``examples`` (model in eval mode: no LoRA dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        total += float(summed_nll(model, batch, device))
        count += scored_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)


def split_examples(examples: list[Example], cfg: FinetuneConfig,
                   rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then ``val_size`` held-out examples and the (capped) training rest."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    val_n = cfg.val_size
    if val_n is None:
        val_n = 0 if cfg.eval_data or len(examples) < 10 else min(128, len(examples) // 10)
    if val_n >= len(examples):
        raise DataError(f"--val-size {val_n} leaves no training examples out of {len(examples)}; lower it")
    val = [examples[i] for i in order[:val_n]]
    train = [examples[i] for i in order[val_n:]]
    if cfg.max_train_samples is not None:
        train = train[:cfg.max_train_samples]
    return train, val


# ---- LoRA -------------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the q, k, v, o, gate, up, down linears of every decoder layer that still have
    weights (removed heads/channels leave zero-sized linears, which get no adapter)."""
    from slimgpt.arch import get_adapter

    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    for layer in adapter.layers:
        a, m = adapter.attention(layer), adapter.mlp(layer)
        for lin in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
            if lin.weight.numel() > 0:
                targets.append(names[id(lin)])
    if not targets:
        raise ModelError("the model has no linear projection left to adapt (every block removed)")
    return targets


def add_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on :func:`lora_targets` (base weights frozen)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("fine-tuning needs peft: pip install 'slimgpt[finetune]' (peft==0.21.2)") from None
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _cycle_batches(train: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Micro-batches over seeded reshuffles of ``train``, epoch after epoch."""
    while True:
        order = list(range(len(train)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [train[i] for i in order[start:start + batch_size]]


def train_lora(model: nn.Module, train: list[Example], val: list[Example], cfg: FinetuneConfig,
               pad_id: int, device: torch.device, progress: bool = True) -> list[dict[str, float]]:
    """Train the LoRA parameters of ``model`` in place; returns the per-step history
    (``step``, ``loss``, ``lr``, ``tokens``, and ``eval_loss`` at evaluation steps; step 0 is the
    evaluation before training)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    rng = random.Random(cfg.seed)
    accum = cfg.accum
    per_step = cfg.batch_size * accum
    micro_per_epoch = math.ceil(len(train) / cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / accum))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    history: list[dict[str, float]] = []
    if val:
        history.append({"step": 0, "eval_loss": evaluate_loss(model, val, pad_id, device, cfg.eval_batch_size)})
        log.info("step 0: held-out loss %.4f", history[-1]["eval_loss"])
    log.info("training %d steps of %d examples (%d x %d accumulated), %d training examples",
             steps, per_step, cfg.batch_size, accum, len(train))
    model.train()
    batches = _cycle_batches(train, cfg.batch_size, rng)
    bar = tqdm(range(1, steps + 1), desc="slimgpt: finetune", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    tokens_seen = 0
    for step in bar:
        group = [collate(next(batches), pad_id) for _ in range(accum)]
        n_tokens = sum(scored_tokens(b) for b in group)
        total = 0.0
        for batch in group:
            if autocast is not None:
                with autocast:
                    nll = summed_nll(model, batch, device)
            else:
                nll = summed_nll(model, batch, device)
            (nll / max(n_tokens, 1)).backward()
            total += float(nll.detach())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = total / max(n_tokens, 1)
        if not math.isfinite(loss):
            from slimgpt.errors import NumericalError

            raise NumericalError(f"training loss became {loss} at step {step}; lower --lr")
        tokens_seen += n_tokens
        entry = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0], "tokens": tokens_seen,
                 "seconds": time.perf_counter() - t0}
        if val and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            entry["eval_loss"] = evaluate_loss(model, val, pad_id, device, cfg.eval_batch_size)
            log.info("step %d: train loss %.4f, held-out loss %.4f", step, loss, entry["eval_loss"])
        history.append(entry)
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k in ("loss", "eval_loss", "lr")})
    model.eval()
    return history


# ---- the whole run ----------------------------------------------------------------------------------


def _source_metadata(path: str) -> dict[str, Any]:
    meta = Path(path).expanduser() / "slimgpt.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        data.pop("format_version", None)
        return data
    return {}


def finetune(cfg: FinetuneConfig, model: Any = None, tokenizer: Any = None,
             progress: bool = True) -> FinetuneResult:
    """Load ``cfg.model`` (or use the given model), train LoRA adapters on ``cfg.data`` and, if
    ``cfg.out`` is set, save the adapters (or, with ``cfg.merge``, the merged model)."""
    from slimgpt.utils import resolve_device, seed_everything

    cfg.validate()
    for source in (cfg.data, cfg.eval_data):
        if source is not None:
            check_source(source)
    if cfg.out is not None and Path(cfg.out).expanduser().exists() and not cfg.overwrite:
        raise ConfigError(f"output {Path(cfg.out).expanduser().resolve()} exists; pass --overwrite or choose another")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if model is None:
        from slimgpt.zoo import load_model

        model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=device)
    if tokenizer is None:
        raise ModelError(f"{cfg.model} has no tokenizer; save one into the model folder")
    _drop_gguf_quantizer(model)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    examples, data_info = build_examples(cfg.data, tokenizer, cfg.seqlen, cfg.data_dir)
    rng = random.Random(cfg.seed)
    train, val = split_examples(examples, cfg, rng)
    eval_info: dict[str, Any] = {"held_out": len(val), "source": "split of --data"} if val else {}
    if cfg.eval_data:
        val, eval_info = build_examples(cfg.eval_data, tokenizer, cfg.seqlen, cfg.data_dir)
        eval_info["source"] = cfg.eval_data

    peft_model = add_lora(model, cfg)
    if Path(cfg.model).expanduser().is_dir():  # adapter_config.json must find the base from anywhere
        for adapter_config in peft_model.peft_config.values():
            adapter_config.base_model_name_or_path = str(Path(cfg.model).expanduser().resolve())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    history = train_lora(peft_model, train, val, cfg, pad_id, device, progress)
    seconds = time.perf_counter() - t0
    report = {
        "finetune": {
            "config": {**asdict(cfg), "grad_accum": cfg.accum, "effective_batch": cfg.batch_size * cfg.accum},
            "data": data_info, "eval": eval_info, "train_examples": len(train),
            "lora_targets": len(lora_targets(model)), "trainable_params": trainable,
            "time_s": seconds, "device": str(device),
            "first_loss": next((h["loss"] for h in history if "loss" in h), None),
            "last_loss": history[-1].get("loss") if history else None,
            "eval_loss": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        },
    }
    result_model: Any = peft_model
    if cfg.merge:
        result_model = merge_lora(peft_model)
    out = None
    if cfg.out is not None:
        meta = {**_source_metadata(cfg.model), **report, "finetune_history": history}
        out = save_finetuned(result_model, tokenizer, cfg.out, meta, cfg.overwrite)
    return FinetuneResult(result_model, tokenizer, history, report, out)


def _drop_gguf_quantizer(model: Any) -> None:
    """Zoo models were dequantised from GGUF to floats, but their config still names the GGUF
    quantizer, which transformers attaches on load and which makes ``save_pretrained`` refuse to
    write. The weights are plain tensors: detach it, as :func:`slimgpt.zoo.convert` does."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        model.hf_quantizer = None


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the weights (``W + B A · alpha/r``) and drop every peft wrapper:
    the result is the plain base model class."""
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def load_adapter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` from an adapter folder written by :func:`finetune` without merge:
    the base (pruned) model is the one recorded in ``adapter_config.json``."""
    folder = Path(path).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"{folder} has no adapter_config.json; give a folder written by slimgpt finetune")
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("loading a LoRA adapter needs peft: pip install 'slimgpt[finetune]'") from None
    from slimgpt.zoo import load_model

    base_path = json.loads(config.read_text()).get("base_model_name_or_path")
    base, tokenizer = load_model(base_path, device=device)
    return PeftModel.from_pretrained(base, folder).eval(), tokenizer


def save_finetuned(model: Any, tokenizer: Any, out: str | Path, metadata: dict[str, Any],
                   overwrite: bool = False) -> Path:
    """Adapters (a PeftModel) → adapter folder (+ tokenizer, ``slimgpt_finetune.json``); a merged
    slim model → a pruned-model folder (:func:`slimgpt.io.save_pruned`); a merged stock model →
    ``save_pretrained``. Atomic in every case."""
    if hasattr(model, "peft_config"):
        return _save_folder(model, tokenizer, out, overwrite, "slimgpt_finetune.json", metadata)
    _drop_gguf_quantizer(model)
    if model.config.model_type.startswith("slimgpt_"):
        from slimgpt.io import save_pruned

        return save_pruned(model, tokenizer, out, metadata, overwrite=overwrite)
    return _save_folder(model, tokenizer, out, overwrite, "slimgpt.json", metadata)


def _save_folder(model: Any, tokenizer: Any, out: str | Path, overwrite: bool, meta_name: str,
                 metadata: dict[str, Any]) -> Path:
    """``save_pretrained`` of model and tokenizer plus a metadata JSON, written atomically."""
    from slimgpt.io import atomic_path

    with atomic_path(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / meta_name).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return Path(out).expanduser().resolve()


__all__ = ["Example", "FinetuneConfig", "FinetuneResult", "add_lora", "alpaca_examples", "build_examples",
           "evaluate_loss", "finetune", "load_adapter", "lora_targets", "merge_lora", "save_finetuned", "text_examples",
           "train_lora"]
