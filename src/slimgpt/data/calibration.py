"""Calibration windows: ``nsamples`` random ``seqlen``-token windows, as GPTQ and SlimGPT draw them.

Sampling (deterministic for a seed; a private ``random.Random(seed)``, global RNGs untouched):

* Documents are visited in a seeded random order and tokenised without special tokens, in
  batches, until the documents that are at least one window long hold ``nsamples`` windows'
  worth of tokens (or every document has been read).
* **Document mode** (when that is reached): each sample picks a random long-enough document and
  a random window inside it, exactly the GPTQ/SlimGPT C4 recipe (documents drawn uniformly).
* **Stream mode** (documents too short, e.g. instruction data): the visited documents are
  concatenated in that random order with the tokenizer's EOS between them, and windows are cut
  from the stream: distinct, non-overlapping slots when the stream holds ``nsamples`` of them,
  otherwise random (overlapping) offsets with a warning.

BOS policy, shared with :mod:`slimgpt.evaluation.perplexity` so calibration and evaluation see
the same kind of input: text is always tokenised with ``add_special_tokens=False``; if the
tokenizer's default call puts BOS in front of text (Gemma, Llama-2), every window is ``[BOS] +
seqlen-1`` text tokens, because those models are never run without it. Tokenizers that add
nothing by default (SmolLM2, Qwen2.5) get plain ``seqlen`` text-token windows, which is what
``tokenizer(text)`` gives them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slimgpt.data.corpora import load_documents
from slimgpt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_BATCH_DOCS = 64
_STREAM_READ_FACTOR = 4  # stop reading short documents once the stream holds 4x what is needed


def needs_bos(tokenizer: Any) -> bool:
    """True when ``tokenizer(text)`` starts with BOS by default: then every window gets one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer that cannot encode a letter: fall back to its flag
        return bool(getattr(tokenizer, "add_bos_token", False))
    return bool(ids) and ids[0] == bos


def encode(tokenizer: Any, texts: str | list[str]) -> Any:
    """Token ids without special tokens and without the 'longer than the model' warning."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if nsamples < 1:
        raise ConfigError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")


def windows_from_documents(
    documents: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sample the windows from in-memory documents (see the module docstring); also returns
    how they were drawn, for the run report."""
    _check_sizes(nsamples, seqlen)
    bos = needs_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen  # text tokens per window
    want = nsamples * body
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)

    tokenised: list[list[int]] = []
    long_tokens = total = 0
    for start in range(0, len(order), _BATCH_DOCS):
        batch = [documents[i] for i in order[start : start + _BATCH_DOCS]]
        for ids in encode(tokenizer, batch):
            tokenised.append(list(ids))
            total += len(ids)
            if len(ids) >= body:
                long_tokens += len(ids)
        if long_tokens >= want or total >= _STREAM_READ_FACTOR * want:
            break

    rows: list[list[int]]
    if long_tokens >= want:
        mode = "documents"
        long_docs = [ids for ids in tokenised if len(ids) >= body]
        rows = []
        for _ in range(nsamples):
            ids = long_docs[rng.randrange(len(long_docs))]
            s = rng.randint(0, len(ids) - body)
            rows.append(ids[s : s + body])
    else:
        mode = "stream"
        eos = getattr(tokenizer, "eos_token_id", None)
        stream: list[int] = []
        for i, ids in enumerate(tokenised):
            if i and eos is not None:
                stream.append(eos)
            stream.extend(ids)
        if len(stream) < body:
            have = len(stream) + (1 if bos else 0)
            raise DataError(
                f"calibration text has {have} tokens, need at least seqlen={seqlen}; "
                "lower --seqlen or give more text"
            )
        slots = len(stream) // body
        if slots >= nsamples:
            starts = [k * body for k in rng.sample(range(slots), nsamples)]
        else:
            log.warning(
                "calibration text holds only %d distinct %d-token windows for %d samples; samples overlap",
                slots, seqlen, nsamples,
            )
            starts = [rng.randint(0, len(stream) - body) for _ in range(nsamples)]
        rows = [stream[s : s + body] for s in starts]

    out = torch.tensor(rows, dtype=torch.long)
    if bos:
        out = torch.cat([torch.full((nsamples, 1), tokenizer.bos_token_id, dtype=torch.long), out], dim=1)
    info = {"mode": mode, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "bos": bos,
            "documents_read": len(tokenised), "tokens_read": total}
    return out, info


def sample_calibration(
    source: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`get_calibration` plus a provenance dict (source, sha256, sampling mode)."""
    _check_sizes(nsamples, seqlen)
    docs, source_info = load_documents(source, data_dir)
    windows, info = windows_from_documents(docs, tokenizer, nsamples, seqlen, seed)
    return windows, {"source": source_info, **info}


def get_calibration(
    source: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """``(nsamples, seqlen)`` token ids for calibration.

    ``source``: ``c4`` (default in the CLI), ``wikitext2`` (the *train* split, never test),
    ``wiki`` (Wikipedia articles), a ``.txt``/``.jsonl``/``.json`` file, or a hub dataset
    ``org/name[:config[:split]]``.
    """
    return sample_calibration(source, tokenizer, nsamples, seqlen, seed, data_dir)[0]
