"""One pruning run as named steps: start → load → calibrate → execute (plan widths, run, cut) →
report → save. :func:`slimgpt.api.prune` calls them in this order.

How a method runs is decided once, in :func:`make_execution`: a layer-wise method
(:class:`~slimgpt.methods.base.Method`) goes through :class:`LayerwiseExecution` (width schedule,
the layer-wise driver, a :class:`~slimgpt.driver.LayerStore`, per-layer checkpoints); a
whole-model method (:class:`~slimgpt.methods.base.GlobalMethod`) through :class:`WholeModelExecution`
(its own plan, an optional search journal). Where layers live during a layer-wise run (in memory,
streamed from disk, checkpointed) is decided once, in :func:`open_store`.

Under ``torchrun`` every step runs on every rank (:mod:`slimgpt.distributed`): the same windows are
sampled everywhere, the driver and the block search split them, and whatever is decided or written
(the checkpoint, the search journal, the saved folder) is done by rank 0 and shared with
:func:`~slimgpt.distributed.agree`.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgpt import __version__, distributed, streaming
from slimgpt.arch import ADAPTERS, get_adapter
from slimgpt.checkpoint import (
    Checkpoint,
    StorageError,
    data_identity,
    kill_point,
    run_settings,
    storage_error,
)
from slimgpt.config import PruneConfig
from slimgpt.driver import LayerStore, layer_spaces, run_layerwise
from slimgpt.errors import ConfigError, DistributedError, ModelError, SlimGPTError
from slimgpt.io import save_dtype, source_dtype
from slimgpt.methods import make_method
from slimgpt.methods.base import GlobalMethod, Method, PruneContext
from slimgpt.plan import LayerPlan
from slimgpt.runner import Timer
from slimgpt.schedule import (
    LayerSpace,
    LayerWidth,
    model_kind,
    removed_params,
    solve_widths,
    target_constraint,
    widths_violation,
)
from slimgpt.serving import route_for
from slimgpt.surgery import layer_shapes, parameter_count, shrink_model
from slimgpt.utils import PeakMemory, resolve_device, resolve_dtype, seed_everything

log = logging.getLogger("slimgpt.api")


@dataclass
class Run:
    """What the steps of one run share. Filled in step by step."""

    cfg: PruneConfig  # resolved (device-dependent defaults filled in)
    device: torch.device
    dtype: torch.dtype
    method: Method | GlobalMethod
    progress: bool = True
    source_dir: Path | None = None  # the model's local folder (None: in memory or a hub id)
    save_dtype: torch.dtype | None = None  # what the weights are written in (None: the run's dtype)
    stream: bool = False  # layers are read from disk one at a time
    model: Any = None
    tokenizer: Any = None
    adapter: Any = None
    source: Any = None  # streaming.SourceWeights of a streamed run
    calib: torch.Tensor | None = None
    calib_info: dict[str, Any] = field(default_factory=dict)
    dense_params: int = 0
    spaces: list[LayerSpace] = field(default_factory=list)
    mem: PeakMemory | None = None
    allocation: dict[str, Any] | None = None  # --schedule auto: candidates, scores, choice, time
    t_start: float = field(default_factory=time.perf_counter)
    t_loaded: float = 0.0


@dataclass
class Outcome:
    """What executing the method produced."""

    plans: dict[int, LayerPlan]
    seconds: dict[str, float]  # forward / hessian / solver buckets
    model: Any  # the pruned model, or None when streamed (the saved folder holds it)
    widths: list[LayerWidth] | None = None  # the solved schedule of a layer-wise run
    io_seconds: dict[str, float] = field(default_factory=dict)
    resumed_from_layer: int = 0
    prune_s: float = 0.0
    surgery_s: float = 0.0
    activations: dict[str, Any] = field(default_factory=dict)  # where the driver kept them


# ---------------------------------------------------------------------------------- steps
def start(cfg: PruneConfig, in_memory: bool, progress: bool = True) -> Run:
    """Validate, resolve device/dtype/calibration size, seed, build the method; refuse option
    combinations the method cannot honour before anything is loaded."""
    cfg.validate()
    device = distributed.init(resolve_device(cfg.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    dtype = resolve_dtype(cfg.dtype, device)
    cfg = cfg.resolved(device)
    seed_everything(cfg.seed)  # the same windows on every rank: the shards add up to the whole set
    run = Run(cfg, device, dtype, make_method(cfg), progress and distributed.is_main())
    if distributed.is_distributed():
        check_distributed(run)
    whole_model = isinstance(run.method, GlobalMethod)
    resumable = not whole_model or getattr(run.method, "resumable", False)
    if whole_model and ((cfg.resume and not resumable) or cfg.max_memory or cfg.offload_activations):
        raise ConfigError(f"--method {cfg.method} decides over the whole model at once: it cannot "
                          f"{'' if resumable else '--resume, '}stream layers (--max-memory) or offload activations; "
                          "drop those options")
    if cfg.resume and cfg.out is None:
        raise ConfigError("--resume continues the run checkpointed beside --out; give the same --out")
    run.stream = not in_memory and not whole_model and streaming.wants_streaming(cfg, dtype)
    if run.stream and cfg.out is None:
        raise ConfigError("a streamed run (--max-memory) writes the model layer by layer and needs --out")
    run.source_dir = streaming.local_model_folder(cfg.model) if not in_memory else None
    return run


def check_distributed(run: Run) -> None:
    """Refuse, on every rank alike, what cannot be split across the torchrun processes."""
    c, n = run.cfg, distributed.world()
    if why := getattr(run.method, "single_process", None):  # a method that says why it cannot be split
        raise ConfigError(why)
    if not getattr(run.method, "distributed", False):
        raise ConfigError(f"--method {c.method} does not split its work across torchrun processes; run it in one "
                          "process (without torchrun), or use slimgpt, blockpruner or slimgpt+blockpruner")
    assert c.nsamples is not None
    windows = min(c.nsamples, c.search_nsamples or c.nsamples) if isinstance(run.method, GlobalMethod) else c.nsamples
    if -(-windows // c.batch_size) < n:
        raise ConfigError(f"{n} processes need at least {n} calibration batches; {windows} windows make "
                          f"{-(-windows // c.batch_size)} of --batch-size {c.batch_size}: lower --batch-size or "
                          "start fewer processes")


def load(run: Run, model: Any = None, tokenizer: Any = None) -> None:
    """The model (or, streamed, its weightless skeleton), its tokenizer and adapter."""
    from slimgpt.zoo import load_model

    if run.source_dir is not None:
        check_architecture(run.source_dir)  # before loading gigabytes of weights
    if model is None:
        if run.stream:
            model, tokenizer, run.source = streaming.load_skeleton(run.cfg.model, run.dtype)
        else:
            model, tokenizer = load_model(run.cfg.model, dtype=run.dtype, device="cpu")
        source = source_dtype(run.source_dir or run.cfg.model)  # after loading: a hub id's config is cached
    else:
        source = next(model.parameters()).dtype
        model.to(run.dtype)
    run.save_dtype = save_dtype(run.cfg.save_dtype, source, run.dtype)
    run.model, run.tokenizer, run.adapter = model, tokenizer, get_adapter(model)
    run.t_loaded = time.perf_counter()


def calibrate(run: Run) -> None:
    """Calibration windows, the dense parameter count and what each layer can give up."""
    from slimgpt.data.calibration import sample_calibration

    c = run.cfg
    run.calib, run.calib_info = sample_calibration(c.calib, run.tokenizer, c.nsamples, c.seqlen, c.seed, c.data_dir)
    run.dense_params = parameter_count(run.model)
    run.spaces = layer_spaces(run.adapter)
    c.check_model([s.channels for s in run.spaces], *model_kind(run.model.config))  # --target: before the long work
    run.mem = PeakMemory(run.device)


def plan_widths(run: Run, ckpt: Checkpoint | None = None) -> list[LayerWidth]:
    """Per-layer widths from the schedule, solved to the whole-model parameter target
    (``auto``: chosen by :mod:`slimgpt.allocation` from the calibration windows, or read back from
    ``ckpt`` when this run chose them before it was interrupted)."""
    c = run.cfg
    fixed = None
    if Path(c.schedule).is_file():  # per-layer widths (pruned at exactly those) or ratios
        from slimgpt.allocation import read_widths_file

        fixed = read_widths_file(c.schedule, run.spaces)
    if fixed is not None:
        widths = fixed
        if why := widths_violation(c.target, run.spaces, fixed, *model_kind(run.model.config)):  # given, not chosen
            raise ConfigError(f"the widths in {c.schedule} are outside what --target {c.target} serves ({why}); "
                              "change them or drop --target")
    elif c.schedule == "auto" and c.method == "slimgpt":
        widths = auto_widths(run, ckpt)
    else:  # other layer-wise methods keep the paper's schedule under the default
        schedule = "log" if c.schedule == "auto" else c.schedule
        widths = solve_widths(run.spaces, run.dense_params, c.ratio, schedule, c.first_ratio,
                              constraint=target_constraint(c.target, *model_kind(run.model.config)))
    planned = removed_params(run.spaces, widths)
    log.info("target: remove %.1f%% of %s parameters; planned %s (%.2f%%)", 100 * c.ratio,
             f"{run.dense_params:,}", f"{planned:,}", 100 * planned / run.dense_params)
    return widths


def auto_widths(run: Run, ckpt: Checkpoint | None = None) -> list[LayerWidth]:
    """``--schedule auto``: score the allocation family on the dense model (rank 0 under torchrun;
    every rank gets the same widths) and keep the lowest calibration KL."""
    from slimgpt import allocation

    c = run.cfg
    weights = None
    if run.stream:  # the pass reads one layer at a time from disk, as the prune does
        assert run.source is not None
        weights = streaming.StreamedWeights(streaming.StreamingStore(run.adapter, run.source, run.dtype, None),
                                            run.device)
    assert c.nsamples is not None and c.seqlen is not None and run.calib is not None
    hess, score = allocation.auto_windows(c.nsamples, c.seqlen, run.spaces)  # disjoint: scored held out
    settings = allocation.AutoSettings(hess, list(range(hess, hess + score)),
                                       head_score=getattr(run.method, "head_score", "gcd"), min_group=c.min_group,
                                       damp=c.damp, batch_size=c.batch_size)

    def choose() -> allocation.AutoResult:
        saved = ckpt.load_allocation() if ckpt is not None else None
        if saved is not None:
            log.info("--schedule auto: %s, chosen before the interruption, read from %s", saved["chosen"], ckpt.folder)
            return allocation.AutoResult.from_dict(saved)
        family = allocation.candidates(run.spaces, run.dense_params, c.ratio, c.first_ratio,
                                       target_constraint(c.target, *model_kind(run.model.config)))
        with distributed.solo():  # rank 0 scores on its own (its Hessians are not reduced); the others wait
            res = allocation.choose_allocation(run.adapter, run.calib, run.spaces, family, run.device, settings,
                                               progress=run.progress, weights=weights)
        res.settings["windows"]["calibration_seed"] = c.seed  # which windows: seed + indices name them
        if ckpt is not None:
            ckpt.save_allocation(res.to_dict())
        return res

    res = distributed.agree(choose, "choosing the --schedule auto allocation")
    run.allocation = res.summary()
    return res.widths


def open_store(run: Run, ckpt: Checkpoint | None) -> LayerStore:
    """Where layers live during a layer-wise run: streamed from disk (and written as they finish)
    or kept in the model, checkpointed after every layer when there is a checkpoint."""
    if not distributed.is_main():
        ckpt = None  # rank 0 writes the checkpoint; the others only read it to resume
    # activations that fit nowhere in memory go beside the output (same disk, not a RAM-backed /tmp)
    out = Path(run.cfg.out).expanduser().resolve() if run.cfg.out else None
    spill = out.with_name(out.name + ".activations") if out is not None else None
    if run.stream:
        assert (ckpt is not None or not distributed.is_main()) and run.source is not None
        store = streaming.StreamingStore(run.adapter, run.source, run.dtype, ckpt, run.cfg.offload_activations, spill)
        store.warn_budget(run.cfg, streaming.parse_size(run.cfg.max_memory) if run.cfg.max_memory else None)
        return store
    return streaming.InMemoryStore(run.adapter, ckpt, run.cfg.offload_activations, spill)


def context(run: Run, timer: Timer) -> PruneContext:
    """What a whole-model method gets; ``run_layers`` lets it run a layer-wise pass (the hybrid)."""
    ctx = PruneContext(run.model, run.adapter, run.calib, run.cfg, run.device, run.spaces, run.dense_params,
                       timer, run.progress)

    def run_layers(method: Method, widths: list[LayerWidth], spaces: list[LayerSpace]) -> dict[int, LayerPlan]:
        res = run_layerwise(run.adapter, run.calib, method, widths, spaces, run.device, run.cfg.batch_size,
                            run.cfg.propagate, progress=run.progress, compensate=run.cfg.compensate)
        for k, v in res.seconds.items():
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
        return res.plans

    ctx.run_layers = run_layers
    return ctx


# ---------------------------------------------------------------------------------- executions
class Execution:
    """How a method runs (:meth:`execute`) and its result is written (``_save``, rank 0 only)."""

    def execute(self, run: Run) -> Outcome:
        raise NotImplementedError

    def _save(self, run: Run, model: Any, report: dict[str, Any]) -> Path:
        raise NotImplementedError

    def save(self, run: Run, model: Any, report: dict[str, Any]) -> Path:
        """Rank 0 writes the output folder; every rank gets its path."""
        return distributed.agree(lambda: self._save(run, model, report), "saving the model")


INPUTS_EVERY = 10  # GPU runs: write a layer's inputs once 10x the last such write's duration has passed


class LayerwiseExecution(Execution):
    """A layer-wise method: widths from the schedule, the driver over every layer (resuming from
    the checkpoint beside ``--out``), each layer cut as it finishes."""

    def __init__(self, run: Run) -> None:
        self.ckpt: Checkpoint | None = None
        self.commit_s = 0.0
        self.device = run.device
        self.inputs_saved: tuple[float, float] | None = None  # (when, how long) the last inputs were written
        self.activations: dict[str, Any] = {}
        if run.cfg.out is not None:  # opened before loading: a refused --resume costs nothing
            settings = run_settings(run.cfg, run.device, run.dtype)
            source = run.source_dir.resolve() if run.source_dir else None
            # rank 0 decides (it may clear a stale folder); every rank gets the same state
            self.ckpt = distributed.agree(lambda: Checkpoint.open(run.cfg.out, settings, run.cfg.resume, source),
                                          "opening the checkpoint")

    def execute(self, run: Run) -> Outcome:
        adapter, ckpt = run.adapter, self.ckpt
        t0 = time.perf_counter()
        if ckpt is not None:
            if ckpt.done and not ckpt.folder.is_dir():
                raise ConfigError(f"rank {distributed.rank()} cannot read {ckpt.folder}: --resume under torchrun needs "
                                  "--out on a filesystem every node can read")
            ckpt.bind(data_identity(run.calib, run.source_dir, run.model), adapter)  # same data and model to resume
        widths = plan_widths(run, ckpt if distributed.is_main() else None)
        writer = ckpt if distributed.is_main() else None
        store = open_store(run, ckpt)
        plans: dict[int, LayerPlan] = {}
        seconds: dict[str, float] = {}
        start, inputs, reference = 0, None, None
        if ckpt is not None and ckpt.done:
            start = ckpt.done
            plans = ckpt.restore(adapter, materialize=not run.stream)
            if start < adapter.num_layers:
                inputs = ckpt.load_inputs(mmap=run.cfg.offload_activations is not None)
                reference = ckpt.load_reference(mmap=run.cfg.offload_activations is not None)  # --compensate
            log.info("resuming from %s: layers 0..%d are done", ckpt.folder, start - 1)
        try:
            if start < adapter.num_layers:
                result = run_layerwise(
                    adapter, run.calib, run.method, widths, run.spaces, run.device, run.cfg.batch_size,
                    run.cfg.propagate, progress=run.progress, start_layer=start, inputs=inputs,
                    on_layer_done=self.commit if ckpt is not None else None, store=store,
                    compensate=run.cfg.compensate, reference=reference,
                )
                plans.update(result.plans)
                seconds = result.seconds
                self.activations = result.activations
        except StorageError:
            raise
        except DistributedError as e:  # another rank died: what is committed stays for --resume
            saved = f"{ckpt.done} of {adapter.num_layers} layers are saved in {ckpt.folder}; " if writer and ckpt else ""
            raise DistributedError(f"{e}; {saved}rerun the same command with --resume to continue") from None
        except SlimGPTError:
            if writer is not None:
                writer.discard()  # a resume would fail the same way: leave nothing behind
            raise
        except KeyboardInterrupt:
            if writer is not None and writer.done:
                log.warning("interrupted: %d of %d layers are saved in %s; rerun the same command with "
                            "--resume to continue", ckpt.done, adapter.num_layers, ckpt.folder)
            raise
        finally:
            store.close()
        t1 = time.perf_counter()
        pruned = None if run.stream else shrink_model(run.model, {})  # every layer is cut already
        io = {**store.seconds, "write": store.seconds.get("write", 0.0) + self.commit_s}
        return Outcome(plans, seconds, pruned, widths, io, start, t1 - t0, time.perf_counter() - t1,
                       activations=self.activations)

    def commit(self, index: int, plan: LayerPlan, hidden: list[torch.Tensor],
               reference: list[torch.Tensor] | None = None) -> None:
        """The driver's ``on_layer_done``: rank 0 commits the layer with every rank's inputs for the
        next one (gathered in batch order: the checkpoint is the single-process one); ``reference``:
        the dense stream's (``--compensate asymmetric|drift``), committed beside them."""
        assert self.ckpt is not None
        ckpt = self.ckpt
        dense: dict[str, Any] = {} if reference is None else {"reference": reference}  # passed only when kept
        if not distributed.is_distributed():
            t = time.perf_counter()
            try:
                if self._inputs_due(index, t):
                    ckpt.commit(index, plan, hidden, **dense)
                    self.inputs_saved = (time.perf_counter(), time.perf_counter() - t)
                else:
                    ckpt.commit(index, plan, hidden, save_inputs=False)
            finally:
                self.commit_s += time.perf_counter() - t  # the next layer's inputs, written with fsync
            return
        full = distributed.gather_to_main(hidden, f"gathering the inputs of layer {index + 1}")
        if reference is not None:
            dense["reference"] = distributed.gather_to_main(reference, f"gathering the dense inputs of layer {index + 1}") or []
        distributed.agree(lambda: ckpt.commit(index, plan, full or [], **dense), f"checkpointing layer {index}")
        if not distributed.is_main():
            kill_point(index)  # (rank 0 passed it inside commit)

    def _inputs_due(self, index: int, now: float) -> bool:
        """Write the next layer's inputs with this layer's checkpoint? Always on a CPU. On a GPU a
        layer takes seconds and its inputs are gigabytes (8B, 256 × 2048 bf16: 4.3 GB), so they are
        written only once :data:`INPUTS_EVERY` times the last write's duration has passed: at most
        about a tenth of the time goes to them, and ``--resume`` redoes the layers since."""
        if self.device.type != "cuda" or self.inputs_saved is None or self.ckpt is None \
                or index + 1 >= self.ckpt.num_layers:
            return True
        at, took = self.inputs_saved
        return now - at >= INPUTS_EVERY * took

    def _save(self, run: Run, model: Any, report: dict[str, Any]) -> Path:
        from slimgpt.io import save_pruned

        c = run.cfg
        assert c.out is not None
        try:
            if run.stream:
                assert self.ckpt is not None and run.source is not None
                out = streaming.save_streamed(run.adapter, run.tokenizer, run.source, self.ckpt, c.out, report,
                                              c.overwrite, run.dtype, run.save_dtype)
            else:
                out = save_pruned(model, run.tokenizer, c.out, metadata=report, overwrite=c.overwrite,
                                  dtype=run.save_dtype)
        except OSError as e:
            raise storage_error(e, c.out, self.ckpt) from e
        if self.ckpt is not None:
            self.ckpt.finish()
        return out


class WholeModelExecution(Execution):
    """A whole-model method: its own plan over the model (journalled beside ``--out`` when it
    can resume), then one cut of every layer."""

    def __init__(self, run: Run) -> None:
        self.journal: Any = None

    def execute(self, run: Run) -> Outcome:
        method = run.method
        assert isinstance(method, GlobalMethod)
        t0 = time.perf_counter()
        timer = Timer(run.device)
        ctx = context(run, timer)
        if run.cfg.out is not None and getattr(method, "resumable", False):
            from slimgpt.methods.blockpruner import SearchJournal

            key = {**run_settings(run.cfg, run.device, run.dtype), **data_identity(run.calib, run.source_dir, run.model)}
            out = run.cfg.out
            self.journal = ctx.journal = distributed.agree(
                lambda: SearchJournal(SearchJournal.for_out(out), key, run.cfg.resume), "opening the search journal")
        try:
            plans = method.plan(ctx)
        except DistributedError as e:  # another rank died: the journalled rounds stay for --resume
            hint = "; rerun the same command with --resume to continue" if self.journal is not None else ""
            raise DistributedError(f"{e}{hint}") from None
        t1 = time.perf_counter()
        pruned = shrink_model(run.model, plans)
        return Outcome(plans, dict(timer.seconds), pruned, prune_s=t1 - t0, surgery_s=time.perf_counter() - t1)

    def _save(self, run: Run, model: Any, report: dict[str, Any]) -> Path:
        from slimgpt.io import save_pruned

        c = run.cfg
        assert c.out is not None
        try:
            out = save_pruned(model, run.tokenizer, c.out, metadata=report, overwrite=c.overwrite,
                              dtype=run.save_dtype)
        except OSError as e:
            raise storage_error(e, c.out, None) from e
        if self.journal is not None:
            self.journal.discard()
        return out


def make_execution(run: Run) -> LayerwiseExecution | WholeModelExecution:
    """The one place where layer-wise and whole-model methods part ways."""
    return WholeModelExecution(run) if isinstance(run.method, GlobalMethod) else LayerwiseExecution(run)


# ---------------------------------------------------------------------------------- report
def build_report(run: Run, outcome: Outcome) -> dict[str, Any]:
    """The run's record (``slimgpt.json``): config, method, calibration, parameters, time split,
    memory and the per-layer table, read from the final tensor shapes."""
    cfg, spaces, widths = run.cfg, run.spaces, outcome.widths
    shaped = outcome.model if outcome.model is not None else run.model  # streamed: meta tensors in final shapes
    pruned_params = parameter_count(shaped)
    shapes = layer_shapes(shaped)
    route = served_route(cfg.target, shapes, *model_kind(shaped.config))
    layers = []
    for i, s in enumerate(spaces):
        st = outcome.plans[i].stats if i in outcome.plans else {}
        kept = (shapes[i]["heads"] * s.per_q_head + shapes[i]["kv_heads"] * s.per_kv_head
                + shapes[i]["channels"] * s.per_channel)
        layers.append({
            "layer": i, "schedule_ratio": round(widths[i].ratio, 4) if widths else None,
            "heads": f"{shapes[i]['heads']}/{s.num_heads}", "kv_heads": f"{shapes[i]['kv_heads']}/{s.num_kv_heads}",
            "channels": f"{shapes[i]['channels']}/{s.channels}",
            "params_kept": round(kept / s.params, 4),
            **{k: v for k, v in st.items() if k.endswith(("error", "damp", "groups", "shrink"))},
        })
    secs, io = outcome.seconds, outcome.io_seconds
    auto_s = float(run.allocation["time_s"]["total"]) if run.allocation else 0.0
    assert run.mem is not None
    return {
        "slimgpt_version": __version__,
        "config": cfg.to_dict(),
        "method": run.method.config() | ({"schedule": "auto", "auto": run.allocation} if run.allocation else {}),
        "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
        "saved_dtype": str(run.save_dtype or run.dtype).removeprefix("torch."),  # the weights on disk
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "processes": distributed.world(),  # torchrun ranks that split the calibration windows
        "calibration": run.calib_info,
        "params": {
            "dense": run.dense_params, "pruned": pruned_params,
            "removed_ratio": 1 - pruned_params / run.dense_params, "target_ratio": None if cfg.blocks else cfg.ratio,
            "target_blocks": cfg.blocks,
        },
        "time_s": {
            "load": run.t_loaded - run.t_start, "prune_total": outcome.prune_s,
            "calibration_forward": secs.get("forward", 0.0), "hessian": secs.get("hessian", 0.0),
            "solver": secs.get("solver", 0.0), "surgery": outcome.surgery_s,
            "solver_over_forward": secs.get("solver", 0.0) / max(secs.get("forward", 1e-9), 1e-9),
            "communication": secs.get("communication", 0.0),  # torchrun: reductions, broadcasts (rank 0)
            "offload": secs.get("offload", 0.0),  # layers and their outputs moved between devices
            "stream_read": io.get("load", 0.0), "checkpoint_write": io.get("write", 0.0),
            # --schedule auto: choosing the allocation (its own dense pass, solves and scoring)
            "allocation": auto_s,
            # prune_total outside every bucket above (bookkeeping the buckets do not cover)
            "other": outcome.prune_s - sum(secs.values()) - io.get("load", 0.0) - io.get("write", 0.0) - auto_s,
        },
        "streamed": run.stream,
        "activations": outcome.activations,
        "resumed_from_layer": outcome.resumed_from_layer,
        "memory": run.mem.as_dict(),
        "layers": layers,
        **({"serving": {"target": cfg.target, "route": route}} if route else {}),
    }


def served_route(target: str, shapes: list[dict[str, int]], family: str | None = None,
                 sliding: bool = False) -> str | None:
    """The route of ``--target`` that serves the pruned ``shapes`` of a ``family`` model (``None``
    for ``any``). Every allocation is chosen inside the target's shapes, so a refusal here is a bug,
    not a user error."""
    if target == "any":
        return None
    try:
        return route_for(target, [(s["heads"], s["kv_heads"], s["channels"]) for s in shapes], family, sliding).route
    except ConfigError as e:
        raise AssertionError(f"bug: the pruned model is outside what --target {target} serves, although its "
                             f"allocation was chosen inside it ({e})") from None


def format_layer_table(report: dict[str, Any]) -> str:
    """The per-layer Markdown table printed after pruning."""
    rows = ["| layer | schedule ratio | heads | kv heads | channels | params kept |", "|---|---|---|---|---|---|"]
    for r in report["layers"]:
        ratio = "-" if r["schedule_ratio"] is None else f"{r['schedule_ratio']:.3f}"
        rows.append(
            f"| {r['layer']} | {ratio} | {r['heads']} | {r['kv_heads']} | {r['channels']} "
            f"| {r['params_kept']:.1%} |"
        )
    p, t, m = report["params"], report["time_s"], report["memory"]
    rows.append("")
    rows.append(
        f"parameters: {p['dense']:,} → {p['pruned']:,} (removed {p['removed_ratio']:.2%}, "
        + (f"target {p['target_ratio']:.2%})" if p.get("target_ratio") is not None else f"{p['target_blocks']} blocks)")
    )
    rows.append(
        f"time: {t['prune_total']:.1f} s pruning (forward {t['calibration_forward']:.1f} s, Hessian {t['hessian']:.1f} s, "
        f"solver {t['solver']:.1f} s, offload {t['offload']:.1f} s, other {t['other']:.1f} s; "
        f"solver/forward {t['solver_over_forward']:.2f}), load {t['load']:.1f} s"
    )
    mem = f"peak memory: {m['peak_rss_mib']:.0f} MiB resident"
    if "peak_cuda_mib" in m:
        mem += f", {m['peak_cuda_mib']:.0f} MiB CUDA"
    rows.append(mem)
    return "\n".join(rows)


def check_architecture(folder: Path) -> None:
    """Refuse an architecture without an adapter from its config.json alone."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
    except (OSError, ValueError, AttributeError):
        return  # missing or unreadable: loading says so in one line
    if model_type not in ADAPTERS:
        raise ModelError(
            f"architecture '{model_type}' is not supported yet (supported: {', '.join(sorted(ADAPTERS))}); "
            "add an adapter in src/slimgpt/arch/"
        )
