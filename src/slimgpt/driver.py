"""The layer-wise engine (ALGORITHMS.md §6): capture, prune, propagate, one layer at a time.

Layer 0's inputs are the embeddings of the calibration windows. For each layer: move it to the
compute device, let the method prune it (it runs blocks through a :class:`LayerRunner`), run the
pruned layer to produce the next layer's inputs (pruned-output propagation, the paper's choice;
``propagate="original"`` feeds the next layer the dense model's activations instead), move it
back. Only one layer's weights and the calibration activations are on the compute device.

Where a layer's weights come from and go to is a :class:`LayerStore`'s business: the default
leaves every layer in the model; :mod:`slimgpt.streaming` loads layer ``i`` from the checkpoint
files just before it is pruned and writes/frees it right after, so models larger than memory run
through this same loop and the same method code.

With ``compensate="asymmetric"`` (or ``"drift"``) and pruned-output propagation a second stream
runs beside the pruned one: the *dense* model's hidden states, propagated through the dense
layers (each layer's dense outputs are taken before its weights are edited). The method then
solves toward the dense model's outputs (:meth:`LayerRunner.attention_statistics`), one more
copy of the activations and one more attention and MLP pass per layer.

Where the calibration activations live between layers is decided once (:func:`place_activations`):
on a GPU they stay on it whenever they fit its free memory beside a layer's work, else on the host
(pinned, copied in while the previous batch computes), else on disk; on a CPU in memory, else on
disk. On a GPU the next layer's weights are copied in on a side stream while the current one is
pruned (:class:`LayerPrefetch`). On a CPU none of this moves or changes anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimgpt import distributed
from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError, ModelError, NumericalError
from slimgpt.methods.base import Method
from slimgpt.plan import LayerPlan
from slimgpt.runner import LayerRunner, Timer, embed_batches
from slimgpt.schedule import LayerSpace, LayerWidth
from slimgpt.solvers.hessian import cross_bytes, heldout_bytes, solve_bytes

log = logging.getLogger(__name__)


class LayerStore:
    """Where decoder layers (and the activations between them) live during a layer-wise run.

    This default keeps everything in memory and does nothing; subclasses load a layer's weights
    on :meth:`acquire`, cut/save/free it on :meth:`release`, and may move activations to disk in
    :meth:`keep`.
    """

    # Layer i+1's weights are in memory while layer i is pruned, so a GPU run may copy them in
    # ahead (a streaming store reads a layer only when it is acquired).
    prefetchable = True

    def spill(self) -> str | None:
        """Keep activations on disk from now on (they fit nowhere else); the folder, or None when
        this store cannot (the driver then keeps them on the host and says so)."""
        return None

    def spilled(self) -> str | None:
        """The folder activations are kept in between layers, if any."""
        return None

    def inputs(self, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
               offload: torch.device) -> list[torch.Tensor]:
        """Layer 0's inputs (a streaming store must materialise the embedding first)."""
        return embed_batches(adapter, calib, batch_size, offload)

    def acquire(self, index: int) -> None:
        """Make ``adapter.layers[index]`` hold real weights (it is pruned next)."""

    def release(self, index: int, plan: LayerPlan) -> None:
        """Layer ``index`` is finished: its weights are edited in place and ``plan`` is final."""

    def keep(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index``'s inputs as they should be held until it runs (default: as given)."""
        return hidden

    def keep_reference(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`keep` for the dense model's inputs to layer ``index`` (asymmetric compensation)."""
        return hidden


@dataclass
class DriverResult:
    plans: dict[int, LayerPlan]
    seconds: dict[str, float] = field(default_factory=dict)
    activations: dict[str, Any] = field(default_factory=dict)  # where they lived, bytes per copy


ACTIVATION_COPIES = 3  # a layer's inputs, its attention outputs (cached by LayerRunner), its outputs
MARGIN = 0.9  # of the free memory a plan may fill (allocator fragmentation, CUDA context growth)
COMPENSATIONS = ("symmetric", "asymmetric", "drift")


def activation_copies(propagate: str, compensate: str = "symmetric") -> int:
    """Copies of the calibration activations a run holds at its peak: :data:`ACTIVATION_COPIES`,
    one more for the dense outputs kept while a layer is pruned (``propagate="original"``) or for
    the dense stream of asymmetric compensation (its entries are replaced in place, one copy)."""
    return ACTIVATION_COPIES + (propagate == "original") + dense_stream(propagate, compensate)


def dense_stream(propagate: str, compensate: str) -> bool:
    """Whether a run keeps the dense model's hidden states beside the pruned ones: asymmetric
    compensation with pruned-output propagation (under ``propagate="original"`` the layers already
    see the dense inputs, ``X = X̃``, and asymmetric compensation *is* the symmetric one)."""
    return compensate != "symmetric" and propagate == "pruned"


def layer_work_bytes(adapter: ModelAdapter, batch_size: int, seqlen: int, dtype: torch.dtype,
                     compensate: bool = False) -> int:
    """Bytes a layer's work holds on the compute device besides the calibration activations: the
    layer and the next one (prefetched), the widest Hessian's accumulation and solve (with
    ``compensate``, its cross-covariance and the held-out split beside it), and one batch's FFN intermediates (gate, up,
    their product and its float32 copy for the Hessian; twice with ``compensate``: both streams)."""
    item = dtype.itemsize
    layer = max(sum(p.numel() for p in lay.parameters()) for lay in adapter.layers) * item
    hidden = adapter.decoder.embed_tokens.weight.shape[1]
    widest = max(max(adapter.intermediate_size(lay), hidden) for lay in adapter.layers)
    batch = batch_size * seqlen * (widest * (3 * item + 4) + 6 * hidden * item)
    extra = cross_bytes(hidden, widest) + heldout_bytes(hidden, widest) + batch if compensate else 0
    return 2 * layer + solve_bytes(widest) + batch + extra


def activation_bytes(adapter: ModelAdapter, windows: int, seqlen: int, dtype: torch.dtype) -> int:
    """One copy of the hidden states of ``windows`` calibration windows."""
    return windows * seqlen * adapter.decoder.embed_tokens.weight.shape[1] * dtype.itemsize


def plan_activations(copies_bytes: int, device_need: int, device_free: int | None,
                     host_free: int | None) -> str:
    """``device`` when the activations and a layer's work fit the device's free memory (GPU only:
    ``device_free`` None on a CPU), else ``host`` when the activations fit the memory available (or
    it is unknown), else ``disk``."""
    if device_free is not None and copies_bytes + device_need <= MARGIN * device_free:
        return "device"
    if host_free is None or copies_bytes <= MARGIN * host_free:
        return "host"
    return "disk"


def place_activations(adapter: ModelAdapter, windows: int, seqlen: int, batch_size: int, device: torch.device,
                      dtype: torch.dtype, copies: int, store: LayerStore,
                      compensate: bool = False) -> tuple[torch.device, dict[str, Any]]:
    """Where the activations live between layers (see the module docstring), logged in one line;
    returns the device to keep them on (disk: the host, with ``store`` writing them out)."""
    from slimgpt.preflight import available_memory, device_free_memory

    per_copy = activation_bytes(adapter, windows, seqlen, dtype)
    info: dict[str, Any] = {"bytes_per_copy": per_copy, "copies": copies}
    folder = store.spilled()
    if folder is not None:  # --offload-activations DIR: the user's choice
        where = "disk"
    else:
        free = device_free_memory(device)
        if free is not None:
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        where = plan_activations(copies * per_copy, layer_work_bytes(adapter, batch_size, seqlen, dtype, compensate),
                                 free, available_memory())
        if where == "disk":
            folder = store.spill()
            where = "disk" if folder is not None else "host"
    home = device if where == "device" else torch.device("cpu")
    info["where"] = f"{where} ({folder})" if where == "disk" else where
    label = {"device": f"on {device}", "host": "on the host" if device.type == "cuda" else "in memory",
             "disk": f"on disk ({folder})"}[where]
    log.info("calibration activations %s: %d copies of %.2f GiB", label, copies, per_copy / 2**30)
    return home, info


class LayerPrefetch:
    """Copies layer ``i + 1``'s weights to the GPU on a side stream while layer ``i`` is pruned.

    A worker thread stages each tensor in pinned host memory (torch releases the GIL while it
    copies) and issues an asynchronous host-to-device copy on its own stream; :meth:`install`
    makes the compute stream wait for that copy and swaps the device tensors into the layer.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimgpt-prefetch")
        self.pending: dict[int, Future] = {}

    def start(self, index: int, layer: nn.Module) -> None:
        self.pending[index] = self.pool.submit(self._copy, layer)

    def _copy(self, layer: nn.Module) -> tuple[list[tuple[nn.Module, str, bool, torch.Tensor]], Any, list]:
        staged, out = [], []
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else _null()
        with ctx:
            for m in layer.modules():
                for table, is_param in ((m._parameters, True), (m._buffers, False)):
                    for name, t in table.items():
                        if t is None or t.device == self.device:
                            continue
                        src = t.data
                        if self.stream is not None and not src.is_pinned():
                            src = src.pin_memory()
                        staged.append(src)
                        out.append((m, name, is_param, src.to(self.device, non_blocking=self.stream is not None)))
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return out, event, staged

    def install(self, index: int) -> bool:
        """Put the prefetched tensors of layer ``index`` in place; False if none were started."""
        fut = self.pending.pop(index, None)
        if fut is None:
            return False
        tensors, event, _staged = fut.result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
        for m, name, is_param, t in tensors:
            if event is not None:
                t.record_stream(current)  # allocated on the side stream, used and freed on this one
            if is_param:
                m._parameters[name].data = t
            else:
                m._buffers[name] = t
        return True

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def to_home(tensors: list[torch.Tensor], home: torch.device, device: torch.device) -> list[torch.Tensor]:
    """Activations to where they live between layers. From a GPU to the host: into pinned memory
    (twice the bandwidth of pageable copies, and the next layer's inputs can then be copied in
    asynchronously), waiting for the copies before returning."""
    if device.type != "cuda" or home.type != "cpu":
        return [t.to(home) for t in tensors]
    out = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        out.append(h)
    torch.cuda.current_stream(device).synchronize()
    return out


def layer_spaces(adapter: ModelAdapter) -> list[LayerSpace]:
    """What each layer can give up, read off its current weights."""
    out = []
    for layer in adapter.layers:
        geo = adapter.geometry(layer)
        per_q, per_kv = adapter.attention_params_per_head(layer)
        out.append(
            LayerSpace(
                geo.num_heads, geo.num_kv_heads, adapter.intermediate_size(layer),
                per_q, per_kv, adapter.mlp_params_per_channel(layer),
            )
        )
    return out


def run_layerwise(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    method: Method,
    widths: list[LayerWidth],
    spaces: list[LayerSpace],
    device: torch.device,
    batch_size: int = 8,
    propagate: str = "pruned",
    offload: torch.device | None = None,
    start_layer: int = 0,
    inputs: list[torch.Tensor] | None = None,
    on_layer_done: Callable[..., None] | None = None,
    progress: bool = True,
    store: LayerStore | None = None,
    prefetch: bool | None = None,
    compensate: str = "symmetric",
    reference: list[torch.Tensor] | None = None,
) -> DriverResult:
    """Prune every layer in order; returns the per-layer plans and time per bucket.

    ``start_layer``/``inputs`` resume a run from a checkpoint; ``on_layer_done`` is called with
    each finished layer's plan and the next layer's inputs (to write checkpoints), after
    ``store.release``. ``store`` decides where layer weights live (default: in the model).
    ``offload``: where activations live between layers (default: :func:`place_activations`
    decides); ``prefetch``: copy the next layer in ahead (default: on a GPU when the store allows).

    ``compensate`` (:data:`COMPENSATIONS`): ``symmetric`` compensates each layer for its own removals
    on the inputs it sees (the paper); ``asymmetric`` toward the dense model's outputs of the same
    linear, and ``drift`` toward the dense model's block outputs (residual included) — both keep the
    dense model's stream beside the pruned one (:func:`dense_stream`). Then ``on_layer_done`` gets
    the next layer's dense inputs as a fourth argument, and a resumed run passes them as ``reference``.

    Under ``torchrun`` each rank embeds and propagates only its share of the windows
    (:func:`slimgpt.distributed.shard`; resumed ``inputs`` are that share already); the method's
    Hessians are reduced and its solves shared by the :class:`LayerRunner`, so every rank holds the
    same pruned layer before the next one's activations are computed.
    """
    if propagate not in ("pruned", "original"):
        raise ValueError("propagate must be 'pruned' or 'original'")
    check_compensation(adapter, method, compensate)
    asym = dense_stream(propagate, compensate)
    if compensate != "symmetric" and not asym:
        log.info("--compensate %s under --propagate original: every layer sees the dense inputs, so it equals "
                 "symmetric compensation", compensate)
    if asym and inputs is not None and reference is None:
        raise ConfigError("the checkpoint holds no dense-stream inputs for --compensate; delete its work folder "
                          "(OUT.partial) and run again")
    store = store or LayerStore()
    torch.set_flush_denormal(True)  # fp32 solves on CPU can slow 50x on denormals (measured here)
    timer = Timer(device)
    model_dtype = next(adapter.model.parameters()).dtype
    shard = distributed.shard(calib, batch_size)
    first_window = distributed.shard_start(len(calib), batch_size)
    copies = activation_copies(propagate, compensate)
    if offload is None:
        offload, placed = place_activations(adapter, shard.shape[0], calib.shape[1], batch_size, device, model_dtype,
                                            copies, store, asym)
    else:
        placed = {"where": "given", "device": str(offload)}
    with timer("forward"):
        hidden = inputs if inputs is not None else store.inputs(adapter, shard, batch_size, offload)
        hidden = store.keep(start_layer, hidden)
    ref: list[torch.Tensor] | None = None  # the dense model's inputs to the current layer
    if asym:  # layer 0: the same embeddings (shared tensors); resumed: the checkpointed dense inputs
        ref = list(hidden) if inputs is None else store.keep_reference(start_layer, reference or [])
    if inputs is not None and offload.type == "cuda":  # resumed: the checkpointed inputs come from disk
        with timer("offload"):
            hidden = [h.to(offload) for h in hidden]
            if ref is not None:
                ref = [h.to(offload) for h in ref]
    ctx = adapter.context(calib.shape[1], device, model_dtype)
    plans: dict[int, LayerPlan] = {}
    ahead = LayerPrefetch(device) if (device.type == "cuda" if prefetch is None else prefetch) and store.prefetchable \
        else None
    bar = tqdm(range(start_layer, adapter.num_layers), desc=f"{method.name}: layers", disable=not progress)
    try:
        for i in bar:
            store.acquire(i)
            layer = adapter.layers[i]
            home = next(layer.parameters()).device
            with timer("offload"):
                if ahead is None or not ahead.install(i):
                    layer.to(device)
            if ahead is not None and i + 1 < adapter.num_layers:
                ahead.start(i + 1, adapter.layers[i + 1])
            run = LayerRunner(i, layer, adapter, hidden, ctx, device, timer, reference=ref,
                              drift=compensate == "drift", first_window=first_window)
            ref = None  # the runner owns the dense stream now and advances it in place
            dense_out = None
            if propagate == "original":
                dense = run.outputs()
                with timer("offload"):  # moving activations off the compute device, a cost of its own on a GPU
                    dense_out = to_home(dense, offload, device)
                del dense
            try:
                plan = method.prune_layer(run, widths[i], spaces[i])
            except NumericalError as e:  # solvers do not know the layer; the user needs it
                if f"layer {i} " in f"{e} ":
                    raise
                raise NumericalError(f"layer {i}: {e}") from e
            geo = adapter.geometry(layer)
            plan.stats.update(
                heads=len(plan.kept_heads) if plan.kept_heads is not None else geo.num_heads,
                kv_heads=len(plan.kept_kv_heads(geo.num_heads, geo.num_kv_heads) or [])
                if plan.kept_heads is not None
                else geo.num_kv_heads,
                channels=len(plan.kept_channels) if plan.kept_channels is not None else spaces[i].channels,
                ratio=widths[i].ratio,
            )
            out = run.outputs()
            with timer("offload"):
                out = to_home(out, offload, device)
            hidden = dense_out if dense_out is not None else out
            if asym and i + 1 < adapter.num_layers:
                ref = run.reference_outputs()
            del run
            with timer("offload"):
                layer.to(home)
            plans[i] = plan
            bar.set_postfix(heads=plan.stats["heads"], channels=plan.stats["channels"])
            store.release(i, plan)
            if i + 1 < adapter.num_layers:
                hidden = store.keep(i + 1, hidden)
                if ref is not None:
                    ref = store.keep_reference(i + 1, ref)
            if on_layer_done is not None:
                if asym:
                    on_layer_done(i, plan, hidden, ref)
                else:
                    on_layer_done(i, plan, hidden)
    finally:
        if ahead is not None:
            ahead.close()
    return DriverResult(plans, dict(timer.seconds), placed)


def check_compensation(adapter: ModelAdapter, method: Method, compensate: str) -> None:
    """Refuse a compensation the method or the architecture cannot honour (before any work)."""
    if compensate not in COMPENSATIONS:
        raise ConfigError(f"--compensate must be one of {', '.join(COMPENSATIONS)}; got '{compensate}'")
    if compensate == "symmetric":
        return
    if not getattr(method, "compensates", False):
        raise ConfigError(f"--compensate {compensate} needs a method that solves its weights toward a target "
                          f"(slimgpt); {method.name} does not: drop --compensate")
    if compensate == "drift" and adapter.num_layers and any(
            hasattr(adapter.layers[0], n) for n in ("post_feedforward_layernorm", "pre_feedforward_layernorm")):
        raise ModelError("--compensate drift pulls o_proj/down_proj toward the residual stream, which needs blocks "
                         "that add those outputs to it directly; this model normalises them first (Gemma 3's "
                         "post-norms): use --compensate asymmetric")
