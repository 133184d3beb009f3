"""Pruning models larger than memory: the same layer-wise run with one decoder layer in memory.

SlimGPT is layer-wise by construction (ALGORITHMS.md §6): layer ``i`` needs only its own weights
and its inputs. So a model that does not fit is pruned by the *same* driver and method code, with
a :class:`~slimgpt.driver.LayerStore` that changes where layers live:

1. The model is built on the meta device (accelerate's ``init_empty_weights``): structure and
   shapes, no weights. Embeddings, norm and head stay unloaded too.
2. Layer 0's inputs: the embedding is loaded, the calibration windows embedded, the embedding freed.
3. Layer ``i``: its tensors are read from the safetensors files (memory-mapped, copied out, the
   mapping closed) and placed with ``set_module_tensor_to_device``; the method prunes it; it is cut
   to its plan (:func:`slimgpt.surgery.shrink_layer`), written to the run's work folder
   (:class:`~slimgpt.checkpoint.Checkpoint`, which also makes the run resumable) and sent back
   to the meta device.
4. The output folder is assembled from the per-layer files (hard links, no copy) plus one shard
   each for the embedding, final norm and (untied) head, config, tokenizer and modeling code, then
   renamed into place.

Every step computes exactly what the in-memory path computes, so the two give bitwise-identical
weights (``tests/test_streaming.py``). Peak memory is about one layer, the calibration
activations (three copies: inputs, attention outputs, outputs, and a fourth for the dense stream of
``--compensate asymmetric|drift``; ``--offload-activations DIR`` keeps the inputs in memory-mapped
files), the largest Hessian and its inverse, and the embedding while the first inputs are made and
the output is written.

Multi-GPU: the driver moves one layer at a time to ``--device``, so one GPU is enough to prune;
more GPUs (and machines) split the calibration windows under ``torchrun`` (:mod:`slimgpt.distributed`),
each process streaming its own copy of the current layer when the model does not fit its share of
the node's memory. To *evaluate* a large pruned model across GPUs in one process, load it with
``from_pretrained(out, device_map="auto")``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt import distributed
from slimgpt.arch.base import ModelAdapter
from slimgpt.checkpoint import ActivationFiles, Checkpoint, layer_prefixes, set_tensor
from slimgpt.driver import LayerStore
from slimgpt.errors import ConfigError, ModelError
from slimgpt.io import (
    ST_DTYPES,
    header_length,
    safetensors_data_bytes,
    safetensors_header,
    write_pruned_folder,
)
from slimgpt.plan import LayerPlan
from slimgpt.preflight import available_memory  # one definition: the pre-flight checks use it too
from slimgpt.runner import embed_batches
from slimgpt.utils import parse_size

log = logging.getLogger(__name__)

GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"


# ---- the source checkpoint ------------------------------------------------------------------------


def _itemsize(st_dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}.get(st_dtype, 1)


def weights_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Size of the model's floating-point weights in ``dtype``, from the safetensors headers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for f in files:
            for k, v in safetensors_header(f).items():
                if k == "__metadata__":
                    continue
                n = 1
                for d in v["shape"]:
                    n *= d
                total += n * (dtype.itemsize if v["dtype"] in ("F64", "F32", "F16", "BF16") else _itemsize(v["dtype"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: loading will say so in one line
    return total


class SourceWeights:
    """The tensors of a local safetensors checkpoint, read a few at a time.

    Reads use plain ``readinto`` at the offsets in the file header rather than ``safe_open``'s
    memory map: a mapped tensor's pages count as resident once touched and stay so while the file
    is open, which measured here as a second copy of every tensor read (``safe_open`` still
    validates the files up front).
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._entries: dict[str, tuple[int, dict[str, Any]]] = {}  # name -> (data start, header entry)
        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            else:
                files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelError(f"{folder} has no .safetensors weights; --max-memory streams only safetensors "
                                 "checkpoints (re-save the model with save_pretrained)")
            for path in files:
                with safe_open(str(path), "pt") as f:  # validates the header and offsets
                    keys = list(f.keys())
                header = safetensors_header(path)
                start = 8 + header_length(path)
                for k in keys:
                    self.files[k] = path
                    self.shapes[k] = tuple(header[k]["shape"])
                    self._entries[k] = (start, header[k])
        except ModelError:
            raise
        except Exception as e:  # SafetensorError, OSError, JSON errors: a corrupt or partial folder
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise ModelError(f"could not read the weights in {folder} ({type(e).__name__}: {first}); "
                             "re-save the model with save_pretrained") from None

    def check(self, names: dict[str, tuple[int, ...]]) -> None:
        """Fail before any work if the model expects a tensor the files lack or shape differently."""
        for name, shape in names.items():
            if name not in self.shapes:
                raise ModelError(f"{self.folder} has no tensor '{name}' that the model expects; streaming "
                                 "needs checkpoint names equal to the model's (load it without --max-memory)")
            if self.shapes[name] != tuple(shape):
                raise ModelError(f"tensor '{name}' in {self.folder} has shape {list(self.shapes[name])}, the config "
                                 f"implies {list(shape)}; the folder's config.json and weights do not match")

    def _read(self, name: str) -> torch.Tensor:
        start, entry = self._entries[name]
        if entry["dtype"] not in ST_DTYPES:  # rare formats (fp8, ...): let safetensors decode them
            from safetensors import safe_open

            with safe_open(str(self.files[name]), "pt") as f:
                return f.get_tensor(name).clone()
        t = torch.empty(entry["shape"], dtype=ST_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            with open(self.files[name], "rb") as f:
                f.seek(start + begin)
                if f.readinto(buf) != end - begin:
                    raise ModelError(f"{self.files[name]} ends early (reading '{name}'); re-save the model")
        return t

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``names`` read into memory, floating tensors cast to ``dtype`` (as ``from_pretrained`` does)."""
        out = {}
        for n in names:
            t = self._read(n)
            out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


def _expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes, tied tensors once (under their first name, as save_pretrained)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = tuple(t.shape)
    return out


def local_model_folder(name_or_path: str) -> Path | None:
    """The local folder behind a zoo name or path (converting a zoo model once), else None."""
    from slimgpt.zoo import resolve_model

    path = Path(resolve_model(name_or_path))
    return path if path.is_dir() else None


@dataclass(frozen=True)
class MemoryPlan:
    """What a layer-wise run holds in memory at its peak, in bytes (issue #23: the solve of a wide
    FFN is the largest item after the weights; at 8B one float32 F × F copy is 0.8 GB)."""

    runtime: int  # this process before the model: interpreter, torch, transformers
    weights: int  # the whole model (in memory)
    layer: int  # the largest decoder layer
    embedding: int  # the input embedding (a streamed run loads it alone, to embed the windows)
    activations: int  # calibration activations held in memory (inputs, attention outputs, outputs)
    solve: int  # the widest Hessian's accumulation and solve (:func:`~slimgpt.solvers.hessian.solve_bytes`)
    batch: int  # one calibration batch inside a layer
    copies: int = 3  # copies of the activations in ``activations``

    def in_memory(self) -> int:
        return self.runtime + self.weights + self.activations + self.solve + self.batch

    def streamed(self) -> int:
        return self.runtime + max(self.layer + self.activations + self.solve + self.batch,
                                  self.embedding + self.activations // self.copies)

    def parts(self, streamed: bool) -> str:
        held = f"one layer {_gib(self.layer)}" if streamed else f"weights {_gib(self.weights)}"
        return (f"runtime {_gib(self.runtime)}, {held}, activations {_gib(self.activations)}, Hessian and solve "
                f"{_gib(self.solve)}, one batch {_gib(self.batch)}")


def memory_plan(cfg: Any, dtype: torch.dtype, folder: Path) -> MemoryPlan | None:
    """Estimate of the host's memory from the folder's config and safetensors headers (None when
    unreadable). On a GPU the solve and the batch are on the device, not here. Under ``torchrun`` a
    process holds its share of the activations."""
    from slimgpt.driver import dense_stream
    from slimgpt.preflight import Geometry
    from slimgpt.solvers.hessian import cross_bytes, solve_bytes
    from slimgpt.utils import resolve_device, rss_bytes

    weights = weights_bytes(folder, dtype)
    try:
        geo = Geometry.of(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        geo = None
    if weights is None or geo is None:
        return None
    item = dtype.itemsize
    # --offload-activations maps the inputs from files; the dense stream of asymmetric compensation
    # (getattr: configs from before the option) is one more copy
    dense = dense_stream(cfg.propagate, getattr(cfg, "compensate", "symmetric"))
    copies = (2 if cfg.offload_activations else 3) + dense
    acts = copies * cfg.nsamples * cfg.seqlen * geo.hidden * item // max(1, distributed.world())
    batch = min(cfg.batch_size, cfg.nsamples) * cfg.seqlen * geo.per_token(item) * (1 + dense)
    widest = max(geo.hidden, geo.intermediate)
    solve = solve_bytes(widest) + (cross_bytes(geo.hidden, widest) if dense else 0)
    if resolve_device(cfg.device).type == "cuda":  # a layer's work is on the GPU (the activations may not be)
        batch = solve = 0
    embedding = geo.vocab * geo.hidden * item
    return MemoryPlan(rss_bytes(), weights, geo.layer_params * item, embedding, acts, solve, batch, copies)


def wants_streaming(cfg: Any, dtype: torch.dtype) -> bool:
    """Stream when the in-memory run's peak (:class:`MemoryPlan`: weights, activations, the widest
    solve, one batch, and with ``--max-memory`` the process's own runtime) exceeds ``--max-memory``
    or, without it, the memory available now. Under ``torchrun`` the decision is per process: each
    holds its share of the activations, and the processes on one node share its memory (so
    ``--max-memory`` is per process)."""
    folder = local_model_folder(cfg.model)
    if folder is None:
        if cfg.max_memory is not None:
            raise ConfigError(f"--max-memory streams weights from a local folder; '{cfg.model}' is not one "
                              "(download it first, e.g. with huggingface-cli download)")
        return False
    plan = memory_plan(cfg, dtype, folder)
    if plan is None:
        return False
    if cfg.max_memory is not None:
        budget, what, need = parse_size(cfg.max_memory), f"--max-memory {cfg.max_memory}", plan.in_memory()
    else:
        avail = available_memory()
        if avail is None:
            return False
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.is_distributed() else 1
        budget = int(0.9 * avail) // per_node
        what = f"the {_gib(avail)} available" + (f" shared by {per_node} processes" if per_node > 1 else "")
        need = plan.in_memory() - plan.runtime  # the runtime is already in use, not in what is available
    if need <= budget:
        return False
    log.info("the model needs about %s in memory (%s), more than %s: streaming one layer at a time from %s "
             "(about %s)", _gib(need), plan.parts(False), what, folder, _gib(plan.streamed()))
    return True


def load_skeleton(name_or_path: str, dtype: torch.dtype) -> tuple[nn.Module, Any, SourceWeights]:
    """(model on the meta device, tokenizer, its weights on disk); one-line ModelErrors as
    :func:`slimgpt.zoo.load_model` gives for the same inputs."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import slimgpt.modeling  # noqa: F401  (registers the slim types: pruned folders can be pruned again)
    from slimgpt.zoo import _first_line, resolve_model

    path = resolve_model(name_or_path)
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"--max-memory streams weights from a local folder; '{name_or_path}' is not one")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; give a folder written by save_pretrained or a zoo name")
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:
        raise ModelError(f"could not build the model in {folder} ({_first_line(e)}); re-save it with save_pretrained") from e
    model.tie_weights()
    model.eval()
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except Exception as e:
            raise ModelError(f"could not read {folder / 'generation_config.json'} ({_first_line(e)}); fix or delete it") from e
    source = SourceWeights(folder)
    source.check(_expected_tensors(model))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of {path} ({_first_line(e)}); "
                         "save it into the model folder with tokenizer.save_pretrained") from e
    return model, tokenizer, source


# ---- layer stores ---------------------------------------------------------------------------------


class InMemoryStore(LayerStore):
    """Layers stay in the model; each finished layer is cut to its plan at once (the same cut
    :func:`~slimgpt.surgery.shrink_model` would make at the end) and checkpointed when a
    :class:`Checkpoint` is given."""

    def __init__(self, adapter: ModelAdapter, checkpoint: Checkpoint | None = None,
                 offload_dir: str | Path | None = None, spill_dir: str | Path | None = None) -> None:
        self.adapter = adapter
        self.checkpoint = checkpoint
        self.offload = ActivationFiles(offload_dir) if offload_dir else None
        self.offload_reference: ActivationFiles | None = None  # the dense stream's files, beside them
        self.spill_dir = spill_dir  # where activations go when the driver finds no memory for them
        self.seconds = {"load": 0.0, "write": 0.0}

    def spill(self) -> str | None:
        if self.offload is None and self.spill_dir is not None:
            self.offload = ActivationFiles(self.spill_dir)
        return self.spilled()

    def spilled(self) -> str | None:
        return str(self.offload.root) if self.offload is not None else None

    def release(self, index: int, plan: LayerPlan) -> None:
        from slimgpt.surgery import shrink_layer

        shrink_layer(self.adapter, index, plan)
        if self.checkpoint is not None:
            t = time.perf_counter()
            self.checkpoint.write_layer(index, self.adapter.layers[index], plan)
            self.seconds["write"] += time.perf_counter() - t

    def keep(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.offload.keep(index, hidden) if self.offload is not None else hidden

    def keep_reference(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The dense stream (asymmetric compensation) in its own files beside the inputs'."""
        if self.offload is None:
            return hidden
        if self.offload_reference is None:
            self.offload_reference = ActivationFiles(self.offload.root, "reference")
        return self.offload_reference.keep(index, hidden)

    def close(self) -> None:
        if self.offload_reference is not None:  # first: the inputs' files own the folder
            self.offload_reference.close()
        if self.offload is not None:
            self.offload.close()


class StreamingStore(InMemoryStore):
    """Layer ``i`` is read from disk on :meth:`acquire` and, once cut and written to the
    checkpoint, returned to the meta device on :meth:`release`."""

    prefetchable = False  # layer i+1 is not in memory before it is acquired

    def __init__(self, adapter: ModelAdapter, source: SourceWeights, dtype: torch.dtype,
                 checkpoint: Checkpoint | None, offload_dir: str | Path | None = None,
                 spill_dir: str | Path | None = None) -> None:
        super().__init__(adapter, checkpoint, offload_dir, spill_dir)
        self.source, self.dtype = source, dtype
        self.prefixes = layer_prefixes(adapter)

    @contextmanager
    def _materialized(self, module: nn.Module):
        """``module``'s tensors loaded for the duration; afterwards the very same meta tensors are
        put back (so tied weights stay tied, e.g. the embedding and the head)."""
        from accelerate.utils import set_module_tensor_to_device

        names = {id(m): n for n, m in self.adapter.model.named_modules()}
        prefix = names[id(module)] + "."
        originals = {n: t for n, t in module.state_dict(keep_vars=True).items()}
        t0 = time.perf_counter()
        wanted = {n: self._stored_name(prefix + n, t) for n, t in originals.items()}
        tensors = self.source.load(sorted(set(wanted.values())), self.dtype)
        for n, stored in wanted.items():
            set_module_tensor_to_device(module, n, "cpu", value=tensors[stored], clear_cache=False)
        self.seconds["load"] += time.perf_counter() - t0
        del tensors
        try:
            yield
        finally:
            for n, t in originals.items():
                set_tensor(module, n, t)

    def _stored_name(self, name: str, tensor: torch.Tensor) -> str:
        """The checkpoint's name for ``tensor``: its own, or for a tied tensor (a head tied to the
        embedding) the name it is saved under."""
        if name in self.source.shapes:
            return name
        for other, t in self.adapter.model.named_parameters(remove_duplicate=False):
            if t is tensor and other in self.source.shapes:
                return other
        raise ModelError(f"{self.source.folder} has no tensor '{name}'; load the model without --max-memory")

    def inputs(self, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
               offload: torch.device) -> list[torch.Tensor]:
        with self._materialized(adapter.decoder.embed_tokens):
            hidden = embed_batches(adapter, calib, batch_size, offload)
        _trim_heap()
        return hidden

    def acquire(self, index: int) -> None:
        from accelerate.utils import set_module_tensor_to_device

        layer, prefix = self.adapter.layers[index], self.prefixes[index]
        t0 = time.perf_counter()
        tensors = self.source.load([prefix + n for n in layer.state_dict()], self.dtype)
        for n, t in tensors.items():
            set_module_tensor_to_device(layer, n.removeprefix(prefix), "cpu", value=t, clear_cache=False)
        self.seconds["load"] += time.perf_counter() - t0

    def release(self, index: int, plan: LayerPlan) -> None:
        super().release(index, plan)
        self.adapter.layers[index].to("meta")
        _trim_heap()

    def warn_budget(self, cfg: Any, budget: int | None) -> None:
        """Warn at the start, naming the smallest cap that should hold, when even the streamed run is
        likely to exceed ``budget`` bytes (a cap is never exceeded silently)."""
        plan = memory_plan(cfg, self.dtype, self.source.folder)
        if budget is None or plan is None or plan.streamed() <= budget:
            return
        log.warning("--max-memory %s is below the estimated peak of the streamed run (%s: %s); the smallest cap "
                    "that should hold is %s, or lower --nsamples/--seqlen/--batch-size or add --offload-activations "
                    "DIR", cfg.max_memory, _gib(plan.streamed()), plan.parts(True), _gib(plan.streamed()))


class StreamedWeights:
    """:class:`slimgpt.allocation.Weights` for a streamed run: the embedding, one layer, or the final
    norm and head read from the checkpoint files while used (the layer on the device), then given
    back to the meta device, so that ``--schedule auto`` holds no more weights than the prune."""

    def __init__(self, store: StreamingStore, device: torch.device) -> None:
        self.store, self.device = store, device

    def embedding(self) -> Any:
        return self.store._materialized(self.store.adapter.decoder.embed_tokens)

    @contextmanager
    def layer(self, index: int):  # noqa: ANN201 - a context manager
        layer = self.store.adapter.layers[index]
        with self.store._materialized(layer):  # on exit the meta tensors are put back, wherever these went
            layer.to(self.device)
            yield
        _trim_heap()

    @contextmanager
    def head(self):  # noqa: ANN201 - a context manager
        adapter = self.store.adapter
        with self.store._materialized(adapter.decoder.norm), self.store._materialized(adapter.model.lm_head):
            adapter.decoder.norm.to(self.device)
            adapter.model.lm_head.to(self.device)
            yield


def _trim_heap() -> None:
    """Return freed heap memory to the system. glibc keeps the pages of freed tensors for reuse;
    measured here, a streamed run's resident memory then grew by half a layer per layer (SmolLM2:
    +250 MiB over 30 layers) although nothing was alive."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---- assembling the output --------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_streamed(adapter: ModelAdapter, tokenizer: Any, source: SourceWeights, checkpoint: Checkpoint,
                  out: str | Path, metadata: dict, overwrite: bool, dtype: torch.dtype,
                  save_dtype: torch.dtype | None = None) -> Path:
    """Write the pruned model from the checkpoint's layer files, atomically (see the module docstring),
    the weights in ``save_dtype`` when given (the run's ``dtype`` otherwise).

    Shards: one per decoder layer (hard links to the finished layer files) and a last one with
    everything else; ``model.safetensors.index.json`` maps names to shards as transformers expects.
    """
    from safetensors.torch import save_file

    from slimgpt.surgery import slim_config

    model = adapter.model
    config, model_cls = slim_config(model)
    head = [n for n in _expected_tensors(model) if not n.startswith(tuple(layer_prefixes(adapter)))]
    n = checkpoint.num_layers

    def write_weights(tmp: Path) -> None:
        from safetensors import safe_open

        total = n + len(head)
        weight_map: dict[str, str] = {}
        size = 0
        for i in range(n):
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            _link_or_copy(checkpoint.layer_path(i), tmp / name)
            with safe_open(str(tmp / name), "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
            size += safetensors_data_bytes(tmp / name)
        for j, key in enumerate(head):  # one tensor per shard: in memory one at a time
            name = f"model-{n + j + 1:05d}-of-{total:05d}.safetensors"
            save_file(source.load([key], save_dtype or dtype), str(tmp / name), metadata={"format": "pt"})
            weight_map[key] = name
            size += safetensors_data_bytes(tmp / name)
            _trim_heap()
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)

    return write_pruned_folder(out, config, model_cls.__name__, write_weights, tokenizer, metadata, overwrite,
                               source.folder.resolve(), save_dtype)
