"""Checks that run before any long work: can the output be written, can every model named be
opened, do the calibration and evaluation windows fit the model and the memory.

A user's mistake should cost a second, not a model load, a calibration pass or a baseline
evaluation: every check here reads only files' headers and ``config.json`` and raises a one-line
:class:`~slimgpt.errors.SlimGPTError`. The module imports nothing heavy (argument validation in
:mod:`slimgpt.config` uses it); torch is imported only to ask a GPU for its free memory.

The memory estimates are deliberately rough and on the generous side of what a run needs, so they
refuse what cannot work (16 windows of 100,000 tokens) and never the documented defaults.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError, ModelError

GiB = 2**30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_LOGITS_BUDGET = 2 << 30  # as slimgpt.evaluation.perplexity: fp32 logits per forward are capped at this


# ---------------------------------------------------------------------------------- output paths
def check_writable(path: str | Path, what: str = "output") -> None:
    """Refuse an output path that cannot be created: its nearest existing folder must accept a new
    entry (tried with a temporary folder, removed at once; ``os.access`` says yes to root on
    ``/proc``)."""
    target = Path(path).expanduser().absolute()
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimgpt-write-check-", dir=parent))
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {parent} does not accept new entries ({e.strerror or e}); "
                          "choose another path") from None


# ---------------------------------------------------------------------------------- models
def check_model(name: str, check_config: Callable[[Path], None] | None = None) -> str:
    """Resolve ``name`` (zoo name, folder, GGUF file, hub id) and check that a local folder can be
    opened: config.json readable (and accepted by ``check_config``, e.g. a supported architecture),
    weights present and not truncated, tokenizer files present. Returns what
    :func:`slimgpt.zoo.load_model` will load. Hub ids are not checked (offline)."""
    from slimgpt.zoo import cache_hint, resolve_model

    path = resolve_model(name)
    folder = Path(path)
    if not folder.is_dir():
        return path
    hint = cache_hint(folder)
    read_config(folder)
    if check_config is not None:
        check_config(folder)
    _check_weights(folder, hint)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"could not load the tokenizer of {folder} (no tokenizer files); save it into the model "
                         "folder with tokenizer.save_pretrained")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder (one-line ModelError when missing or unreadable)."""
    f = folder / "config.json"
    if not f.is_file():
        raise ModelError(f"{folder} has no config.json; give a folder written by save_pretrained or a zoo name")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"could not read {f} ({type(e).__name__}: {e}); re-save the model with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{f} is not a JSON object; re-save the model with save_pretrained")
    return cfg


def check_architecture(folder: Path) -> None:
    """Refuse a model type without an adapter (as :func:`slimgpt.pipeline.check_architecture`,
    without importing the pipeline and transformers)."""
    from slimgpt.arch import ADAPTERS

    model_type = read_config(folder).get("model_type", "?")
    if model_type not in ADAPTERS:
        raise ModelError(f"architecture '{model_type}' is not supported yet (supported: {', '.join(sorted(ADAPTERS))}); "
                         "add an adapter in src/slimgpt/arch/")


def _check_weights(folder: Path, hint: str) -> None:
    """Every safetensors file named by the index exists, and every file is as long as its header
    says: a truncated copy fails here in milliseconds instead of after other work."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"could not read the weights index {index} ({type(e).__name__}); {hint}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(f"could not read the weights in {folder}: {len(missing)} shard(s) missing "
                             f"({', '.join(missing[:3])}); {hint}")
    if not files:
        if not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
            raise ModelError(f"could not load the model in {folder}: no weight files (*.safetensors); {hint}")
        return
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            raise ModelError(f"could not read the weights {f}: {problem}; {hint}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or not 0 < n <= min(size - 8, 100 * 2**20):
                return "not a safetensors file (bad header length)"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        return f"not a safetensors file ({type(e).__name__})"
    if size < 8 + n + end:
        return f"truncated ({size:,} of {8 + n + end:,} bytes)"
    return None


# ---------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """What the memory estimates need from ``config.json`` (per-layer lists: their largest entry)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    max_positions: int | None
    masks: int  # explicit attention masks built per calibration length (Gemma 3: full + sliding)

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Geometry | None:
        text = {**cfg, **cfg.get("text_config", {})} if isinstance(cfg.get("text_config"), dict) else cfg
        try:
            hidden = int(text["hidden_size"])
            heads = int(text.get("num_attention_heads") or 1)
            inter = max([int(text.get("intermediate_size") or hidden * 4),
                         *[int(v) for v in text.get("layer_intermediate_size") or []]])
            return cls(
                hidden=hidden, intermediate=inter, heads=heads,
                kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                layers=int(text.get("num_hidden_layers") or 1), vocab=int(text.get("vocab_size") or 0),
                tied=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
                max_positions=int(text["max_position_embeddings"]) if text.get("max_position_embeddings") else None,
                masks=len(set(text.get("layer_types") or ["full_attention"])),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    @property
    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def per_token(self, itemsize: int) -> int:
        """Bytes one token takes inside a layer's forward and Hessian update (hidden states,
        attention projections, the MLP's gate/up/product, an fp32 copy for ``x xᵀ``)."""
        return (8 * self.hidden + 5 * self.intermediate) * max(itemsize, 4)


def geometry(path: str) -> Geometry | None:
    """The geometry of a resolved model (None for hub ids and unreadable configs)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    try:
        return Geometry.of(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return None


def check_positions(name: str, geo: Geometry | None, seqlen: int, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model's ``max_position_embeddings`` (rotary tables, masks and
    the model's quality all stop there; a longer window is minutes of work that cannot help)."""
    if geo is None or geo.max_positions is None or seqlen <= geo.max_positions:
        return
    raise ConfigError(f"{option} {seqlen} is longer than {name} can read (max_position_embeddings "
                      f"{geo.max_positions}); use {option} {geo.max_positions} or less")


# ---------------------------------------------------------------------------------- options read with the model
def check_calibration_source(source: str) -> None:
    """A ``--calib`` naming a file is read now, by the reader calibration uses (so an empty, binary or
    folder path, or a JSON file without records, is refused before any model is loaded); named
    corpora and hub datasets are left to the calibration step."""
    from slimgpt.data.corpora import NAMED_SOURCES, read_documents

    path = Path(source).expanduser()
    if source not in NAMED_SOURCES and (path.exists() or path.suffix.lower() in (".txt", ".jsonl", ".json")):
        read_documents(path)


def check_schedule_file(schedule: str, geo: Geometry | None) -> None:
    """A ``--schedule`` file: one entry per layer of config.json, ratios in [0, 1] or per-layer widths
    (:func:`slimgpt.allocation.read_widths_file` checks a widths entry against the loaded model)."""
    from slimgpt.schedule import SCHEDULES, load_schedule_file

    if geo is None or schedule in SCHEDULES:
        return
    try:
        doc = json.loads(Path(schedule).read_text())
    except (OSError, ValueError):
        doc = None  # a ratio per line, or unreadable: load_schedule_file says which
    items = doc.get("widths") if isinstance(doc, dict) else doc
    if isinstance(items, list) and items and all(isinstance(x, dict) for x in items):
        if len(items) != geo.layers:
            raise ConfigError(f"widths file {schedule} has {len(items)} layers but the model has {geo.layers}")
    elif not isinstance(doc, dict):
        load_schedule_file(schedule, geo.layers)


def check_prunable_ratio(ratio: float, geo: Geometry | None) -> None:
    """Refuse a ``--ratio`` above the share of parameters in attention and MLP blocks (embeddings and
    norms are never pruned), from config.json. Its count leaves out biases and takes a pruned model's
    widest layer for every layer, so within 1 % of the limit the run's own check decides."""
    if geo is None:
        return
    prunable = geo.layers * geo.layer_params
    total = geo.params + (2 * geo.layers + 1) * geo.hidden
    if ratio * total > 1.01 * prunable:
        raise ConfigError(f"--ratio {ratio} asks to remove {ratio * total / 1e6:.1f}M parameters but only "
                          f"{prunable / 1e6:.1f}M ({prunable / total:.1%}) sit in attention and MLP blocks; lower --ratio")


# ---------------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Memory this process could still use: MemAvailable (psutil where installed), capped by a
    cgroup limit if any."""
    found = []
    try:
        import psutil

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def device_free_memory(device: Any) -> int | None:
    """Free memory of a CUDA device (None on CPU: the host's memory is the limit there)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):
        return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 4 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class CalibrationNeed:
    """Bytes a layer-wise calibration pass holds: where they live and what they are."""

    activations: int  # every window's inputs and outputs of the current layer, on the host (whole node)
    batch: int  # one batch inside a layer: hidden states, projections, the explicit mask(s)
    hessians: int  # the attention and MLP Hessians (fp64 sums) and their factors
    weights: int  # the model held on the host (one layer plus the embedding when streamable)
    layer: int  # one layer's weights on the compute device
    local: int = 1  # processes on this node (torchrun), each with its own copy of all but the activations

    def host(self, gpu: bool) -> int:
        own = self.weights + (0 if gpu else self.batch + self.hessians + self.layer)
        return self.activations + self.local * own

    def device(self) -> int:
        """On one GPU (one per process)."""
        return self.batch + self.hessians + self.layer


def calibration_need(geo: Geometry, nsamples: int, seqlen: int, batch_size: int, itemsize: int,
                     offload_activations: bool = False, whole_model: bool = False,
                     processes: tuple[int, int] = (1, 1), dense_stream: bool = False) -> CalibrationNeed:
    """Estimate (see the module docstring) of a calibration pass of ``nsamples`` × ``seqlen`` tokens.
    The attention scores themselves are not counted: the models run SDPA, whose CPU and GPU kernels
    take the explicit mask without materialising batch × heads × seqlen² scores (measured: 0 MiB
    for 4 × 9 heads × 4096², which would be 2.3 GiB). ``processes`` = (on this node, in all) under
    torchrun: each process holds its share of the windows and its own copy of everything else, and
    the host figures are for the whole node. ``dense_stream``: asymmetric compensation keeps the
    dense model's hidden states beside the pruned ones (one more copy of the activations, a second
    batch in flight, and a cross-covariance beside each Hessian)."""
    local, world = processes
    b = max(1, min(batch_size, nsamples))
    copies = 3 + dense_stream
    acts = 0 if offload_activations else copies * nsamples * seqlen * geo.hidden * itemsize * local // max(1, world)
    batch = (b * seqlen * geo.per_token(itemsize)) * (1 + dense_stream) + geo.masks * seqlen * seqlen * itemsize
    if whole_model and geo.vocab:  # block searches score the calibration windows: logits of one batch
        batch += 2 * b * seqlen * geo.vocab * 4
    widest = max(geo.hidden, geo.intermediate)
    hessians = (geo.hidden**2 + geo.intermediate**2) * 8 + 3 * widest * widest * 4
    if dense_stream:  # solvers.hessian.cross_bytes + heldout_bytes (float32), written out: no torch import here
        hessians += geo.hidden * widest * 16 + widest * widest * 20 + geo.hidden * widest * 16
    layer = geo.layer_params * itemsize
    embedding = geo.vocab * geo.hidden * itemsize * (1 if geo.tied else 2)
    weights = geo.params * itemsize if whole_model else min(geo.params * itemsize, layer + embedding)
    return CalibrationNeed(acts, batch, hessians, weights, layer, local)


def check_calibration_memory(name: str, geo: Geometry | None, nsamples: int, seqlen: int, batch_size: int,
                             itemsize: int, device: Any = "cpu", offload_activations: bool = False,
                             whole_model: bool = False, host_free: int | None = None,
                             device_free: int | None = None, processes: tuple[int, int] = (1, 1),
                             dense_stream: bool = False) -> None:
    """Refuse a calibration setting whose activations cannot fit the memory available (host, and
    the GPU's free memory when calibrating on one), naming the largest ``--nsamples`` and
    ``--seqlen`` that would fit."""
    if geo is None:
        return
    gpu = getattr(device, "type", str(device)) == "cuda"
    host_free = available_memory() if host_free is None else host_free
    device_free = device_free_memory(device) if device_free is None and gpu else device_free

    def fits(n: int, s: int) -> bool:
        need = calibration_need(geo, n, s, batch_size, itemsize, offload_activations, whole_model, processes,
                                dense_stream)
        return ((host_free is None or need.host(gpu) <= host_free)
                and (not gpu or device_free is None or need.device() <= device_free))

    if fits(nsamples, seqlen):
        return
    need = calibration_need(geo, nsamples, seqlen, batch_size, itemsize, offload_activations, whole_model, processes,
                            dense_stream)
    where = []
    if host_free is not None and need.host(gpu) > host_free:
        where.append(f"{_gib(need.host(gpu))} of host memory, {_gib(host_free)} available")
    if gpu and device_free is not None and need.device() > device_free:
        where.append(f"{_gib(need.device())} on {device}, {_gib(device_free)} free")
    parts = f"activations {_gib(need.activations)}, one batch of {min(batch_size, nsamples)} in a layer {_gib(need.batch)}"
    best_n = _largest(lambda n: fits(n, seqlen), nsamples - 1)
    best_s = _largest(lambda s: fits(nsamples, s), seqlen - 1)
    options = [f"--nsamples {best_n} at --seqlen {seqlen}"] if best_n else []
    options += [f"--seqlen {best_s} at --nsamples {nsamples}"] if best_s >= 2 else []
    advice = ("the largest that fit: " + " or ".join(options)) if options else "no --nsamples or --seqlen fits"
    if batch_size > 1 and nsamples > 1:
        advice += " (a lower --batch-size also helps)"
    raise ConfigError(f"calibration on {nsamples} windows × {seqlen} tokens needs about "
                      f"{' and '.join(where)} ({parts}); {advice}")


def eval_need(geo: Geometry, seqlen: int, batch_size: int, itemsize: int) -> int:
    """Bytes to score one batch of ``seqlen``-token windows: the weights, one batch through a
    layer, and its logits (fp32 copy and log-softmax; the batch is capped as ``windows_nll`` does)."""
    b = max(1, min(batch_size, _LOGITS_BUDGET // max(1, 4 * seqlen * geo.vocab)))
    return (geo.params * itemsize + b * seqlen * geo.per_token(itemsize) + 3 * b * seqlen * geo.vocab * 4
            + seqlen * seqlen)


def check_eval_memory(name: str, geo: Geometry | None, seqlen: int, batch_size: int, itemsize: int,
                      device: Any = "cpu", free: int | None = None) -> None:
    """Refuse an evaluation window length that cannot fit, naming the largest that would."""
    if geo is None:
        return
    gpu = getattr(device, "type", str(device)) == "cuda"
    free = (device_free_memory(device) if gpu else available_memory()) if free is None else free
    if free is None or eval_need(geo, seqlen, batch_size, itemsize) <= free:
        return
    best = _largest(lambda s: eval_need(geo, s, batch_size, itemsize) <= free, seqlen - 1)
    batch = _largest(lambda b: eval_need(geo, seqlen, b, itemsize) <= free, batch_size - 1)
    options = ([f"--batch-size {batch}"] if batch else []) + ([f"--seqlen {best} or less"] if best >= 2 else [])
    advice = f"use {' or '.join(options)}" if options else "the model alone does not fit"
    raise ConfigError(f"evaluating {name} on windows of {seqlen} tokens needs about "
                      f"{_gib(eval_need(geo, seqlen, batch_size, itemsize))}, more than the {_gib(free)} "
                      f"{'free on ' + str(device) if gpu else 'of memory available'}; {advice}")


def _largest(ok: Any, high: int) -> int:
    """The largest ``x`` in ``[1, high]`` with ``ok(x)`` (``ok`` monotone), else 0."""
    lo, hi = 0, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
