"""Data-parallel runs under ``torchrun``: calibration windows split across processes.

``torchrun --nproc_per_node=N -m slimgpt prune ...`` starts N copies of the same command; each finds
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment and joins one process group (NCCL on CUDA,
each rank on ``cuda:LOCAL_RANK``; gloo on CPU). Every rank samples the same calibration windows
(same seed), then takes a contiguous run of whole *batches* of them (:func:`batch_range`, the
llm-compressor partition), so the union of the shards is the single-process calibration set and
every batch is exactly the batch a single process would run. What is summed over windows is
reduced: raw ``Σ x xᵀ`` and token counts (all-reduced), per-batch NLLs of a block search or a
perplexity (gathered and summed in batch order, so those come out bitwise equal to one process).
Decisions are made once, on rank 0, and shared (:func:`agree`): solver results, checkpoint and
journal state, the saved folder. Only rank 0 writes files.

A rank that dies or hangs makes every collective on the others fail (at once for a closed
connection, after ``SLIMGPT_DIST_TIMEOUT`` seconds, default 1800, for a silent one); the helpers
turn that into one :class:`~slimgpt.errors.DistributedError` line, and the checkpoint stays for
``--resume``. Outside ``torchrun`` (or inside :func:`solo`) every helper is a no-op.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from slimgpt.errors import ConfigError, DistributedError, SlimGPTError

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "SLIMGPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_solo = 0  # > 0 inside solo(): this process acts alone


def launched() -> bool:
    """Started by ``torchrun`` (or anything that sets its variables) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group of several ranks is up and this code is not inside :func:`solo`."""
    return not _solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group; its real rank even inside :func:`solo`)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    """Number of processes sharing the work (1 outside a process group or inside :func:`solo`)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints results."""
    return rank() == 0


def timeout_s() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds; got '{os.environ[TIMEOUT_ENV]}'") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive; got {value}")
    return value


def init(device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group (once per process) and return this rank's device:
    ``cuda:LOCAL_RANK`` for a CUDA device, else ``device``. A no-op outside ``torchrun``."""
    if not launched():
        return device
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank()} has no GPU ({torch.cuda.device_count()} visible); "
                              "start at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise ConfigError(f"this process already joined a {dist.get_backend()} group; one torchrun run uses "
                              "one kind of device")
        return device
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the torchrun process group ({_cause(e)}); check that every node "
                               "uses the same --rdzv-endpoint (or MASTER_ADDR/MASTER_PORT) and --nnodes") from None
    atexit.register(_shutdown)
    log.info("rank %d of %d on %s (%s)", rank(), dist.get_world_size(), device, backend)
    return device


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer is gone: nothing left to tear down cleanly
            pass


@contextmanager
def solo() -> Iterator[None]:
    """Run the body as if this process were alone (every rank computes it whole, nothing is
    split or exchanged): for work that is not split, e.g. a method without a distributed path."""
    global _solo
    _solo += 1
    try:
        yield
    finally:
        _solo -= 1


def _cause(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # drop gloo's "[.../pair.cc:534] " prefix
    return text.split(". ")[0].rstrip(".")[:200]  # the first sentence says what happened


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """A failed collective means another rank died or hung: one line for the user."""
    try:
        yield
    except SlimGPTError:
        raise
    except RuntimeError as e:  # DistError, DistBackendError, gloo/NCCL errors, timeouts
        raise DistributedError(f"another process of this torchrun run stopped or stopped answering during "
                               f"{what} ({_cause(e)}); every process stops") from None


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- splitting ------------------------------------------------------------------------------------


def batch_range(n_batches: int, r: int | None = None, n: int | None = None) -> range:
    """The contiguous run of batch indices rank ``r`` of ``n`` handles (every batch exactly once;
    sizes differ by at most one; a rank may get none when there are fewer batches than ranks)."""
    r = rank() if r is None else r
    n = world() if n is None else n
    return range(n_batches * r // n, n_batches * (r + 1) // n)


def shard_start(windows: int, batch_size: int) -> int:
    """The index of this rank's first window in :func:`shard` (0 in a single process)."""
    if not is_distributed():
        return 0
    return batch_range(-(-windows // batch_size)).start * batch_size


def shard(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's windows: whole batches of ``batch_size``, so every batch is the one a single
    process would run (same shapes, same numbers)."""
    if not is_distributed():
        return windows
    span = batch_range(-(-len(windows) // batch_size))
    return windows[span.start * batch_size : span.stop * batch_size]


# ---- collectives ------------------------------------------------------------------------------------


def all_reduce_sum(t: torch.Tensor, what: str = "a reduction") -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (every rank gets the same result)."""
    if not is_distributed():
        return t
    with _guard(what):
        dev = _comm_device()
        if t.device == dev:
            dist.all_reduce(t)
        else:
            buf = t.to(dev)
            dist.all_reduce(buf)
            t.copy_(buf)
    return t


def all_reduce_int(value: int, what: str = "a reduction") -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    return int(all_reduce_sum(t, what).item())


def broadcast_(t: torch.Tensor, src: int = 0, what: str = "a broadcast") -> torch.Tensor:
    """Overwrite ``t`` with rank ``src``'s values, in place. Written with ``copy_`` so autograd's
    version counter moves (cached activations keyed on it are invalidated, as on rank 0)."""
    if not is_distributed():
        return t
    with _guard(what):
        buf = t.detach().to(_comm_device()).contiguous()
        dist.broadcast(buf, src)
        if rank() != src:
            t.copy_(buf)
    return t


def broadcast_object(obj: T, src: int = 0, what: str = "a broadcast") -> T:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    with _guard(what):
        dist.broadcast_object_list(box, src)
    return box[0]


def gather_rows(rows: list[T], what: str = "a gather") -> list[T]:
    """Every rank's ``rows`` (small picklable items, e.g. per-batch losses) concatenated in rank
    order, i.e. in batch order, on every rank."""
    if not is_distributed():
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    with _guard(what):
        dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def gather_to_main(tensors: list[torch.Tensor], what: str = "gathering activations") -> list[torch.Tensor] | None:
    """Every rank's ``tensors`` (its batches) concatenated in rank order on rank 0, on the device
    of rank 0's first tensor (CPU when it has none); ``None`` on the other ranks. Sent as raw bytes,
    so any dtype travels."""
    if not is_distributed():
        return tensors
    specs = gather_rows([[(tuple(t.shape), t.dtype) for t in tensors]], what)
    dev = _comm_device()
    with _guard(what):
        if rank() != 0:
            for t in tensors:
                dist.send(_as_bytes(t.detach().to(dev)), dst=0)
            return None
        home = tensors[0].device if tensors else torch.device("cpu")
        out = list(tensors)
        for src in range(1, len(specs)):
            for shape, dtype in specs[src]:
                buf = _as_bytes(torch.empty(shape, dtype=dtype, device=dev))
                dist.recv(buf, src=src)
                out.append(buf.view(dtype).view(shape).to(home))
        return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def barrier(what: str = "a barrier") -> None:
    if is_distributed():
        with _guard(what):
            dist.barrier()


def agree(fn: Callable[[], T], what: str = "sharing a result of process 0") -> T:
    """Run ``fn`` on rank 0 only and give every rank its result (picklable). A
    :class:`SlimGPTError` raised by ``fn`` is raised on every rank, so all stop with the same line;
    any other exception stops rank 0 with its traceback and the others with one line."""
    if not is_distributed():
        return fn()
    if rank() == 0:
        try:
            result = fn()
        except SlimGPTError as e:
            broadcast_object(("error", e), what=what)
            raise
        except BaseException as e:
            broadcast_object(("failed", f"{type(e).__name__}: {_cause(e)}"), what=what)
            raise
        broadcast_object(("ok", result), what=what)
        return result
    status, value = broadcast_object(None, what=what)
    if status == "error":
        raise value
    if status == "failed":
        raise DistributedError(f"process 0 failed during {what} ({value}); every process stops")
    return value
