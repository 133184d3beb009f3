"""The public Python API: :func:`prune` and :func:`evaluate_ppl`. The CLI only parses and calls these."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgpt import __version__
from slimgpt.arch import get_adapter
from slimgpt.config import PruneConfig
from slimgpt.driver import layer_spaces, run_layerwise
from slimgpt.errors import ConfigError, SlimGPTError
from slimgpt.methods import make_method
from slimgpt.methods.base import GlobalMethod, PruneContext, Timer
from slimgpt.schedule import removed_params, solve_widths
from slimgpt.utils import PeakMemory, resolve_device, resolve_dtype, seed_everything

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def prune(cfg: PruneConfig, model: Any = None, tokenizer: Any = None, progress: bool = True) -> PruneResult:
    """Prune ``cfg.model`` (or the given in-memory model) and, if ``cfg.out`` is set, save it.

    The output folder is checked before any work and written atomically at the end. With
    ``cfg.out``, a layer-wise run checkpoints every finished layer in ``OUT.partial/``
    (:mod:`slimgpt.checkpoint`; ``cfg.resume`` continues from it). When the model would not fit in
    ``cfg.max_memory`` (or the memory available), layers are streamed from disk one at a time
    (:mod:`slimgpt.streaming`); then ``PruneResult.model`` is ``None`` (load ``out`` to use it).
    """
    from slimgpt import streaming
    from slimgpt.checkpoint import Checkpoint, StorageError, data_identity, run_settings, storage_error
    from slimgpt.data.calibration import sample_calibration
    from slimgpt.io import save_pruned
    from slimgpt.surgery import layer_shapes, parameter_count, shrink_model
    from slimgpt.zoo import load_model

    cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    cfg = cfg.resolved(device)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    method = make_method(cfg)
    layerwise = not isinstance(method, GlobalMethod)
    resumable = layerwise or getattr(method, "resumable", False)
    if not layerwise and ((cfg.resume and not resumable) or cfg.max_memory or cfg.offload_activations):
        raise ConfigError(f"--method {cfg.method} decides over the whole model at once: it cannot "
                          f"{'' if resumable else '--resume, '}stream layers (--max-memory) or offload activations; "
                          "drop those options")
    if cfg.resume and cfg.out is None:
        raise ConfigError("--resume continues the run checkpointed beside --out; give the same --out")
    stream = model is None and layerwise and streaming.wants_streaming(cfg, dtype)
    if stream and cfg.out is None:
        raise ConfigError("a streamed run (--max-memory) writes the model layer by layer and needs --out")
    source_dir = streaming.local_model_folder(cfg.model) if model is None else None
    ckpt = None
    if cfg.out is not None and layerwise:
        ckpt = Checkpoint.open(cfg.out, run_settings(cfg, device, dtype), cfg.resume,
                               source_dir.resolve() if source_dir else None)
    source = None
    if source_dir is not None:
        _check_architecture(source_dir)  # before loading gigabytes of weights
    if model is None:
        if stream:
            model, tokenizer, source = streaming.load_skeleton(cfg.model, dtype)
        else:
            model, tokenizer = load_model(cfg.model, dtype=dtype, device="cpu")
    else:
        model.to(dtype)
    adapter = get_adapter(model)
    t_loaded = time.perf_counter()
    calib, calib_info = sample_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.data_dir)

    dense_params = parameter_count(model)
    spaces = layer_spaces(adapter)
    mem = PeakMemory(device)
    start = 0
    io_seconds: dict[str, float] = {}
    with mem.track():
        t0 = time.perf_counter()
        if not layerwise:
            widths = None
            timer = Timer()
            ctx = PruneContext(model, adapter, calib, cfg, device, spaces, dense_params, timer, progress)
            if cfg.out is not None and resumable:
                from slimgpt.methods.blockpruner import SearchJournal

                key = {**run_settings(cfg, device, dtype), **data_identity(calib, source_dir, model)}
                ctx.journal = SearchJournal(SearchJournal.for_out(cfg.out), key, cfg.resume)
            plans = method.plan(ctx)
            seconds = dict(timer.seconds)
            t1 = time.perf_counter()
            pruned = shrink_model(model, plans)
        else:
            widths = solve_widths(spaces, dense_params, cfg.ratio, cfg.schedule, cfg.first_ratio)
            planned = removed_params(spaces, widths)
            log.info(
                "target: remove %.1f%% of %s parameters; planned %s (%.2f%%)",
                100 * cfg.ratio, f"{dense_params:,}", f"{planned:,}", 100 * planned / dense_params,
            )
            if ckpt is not None:
                ckpt.bind(data_identity(calib, source_dir, model), adapter)  # same data and model to resume
            if stream:
                assert ckpt is not None and source is not None
                store: streaming.InMemoryStore = streaming.StreamingStore(
                    adapter, source, dtype, ckpt, cfg.offload_activations)
                store.warn_budget(cfg, streaming.parse_size(cfg.max_memory) if cfg.max_memory else None)
            else:
                store = streaming.InMemoryStore(adapter, ckpt, cfg.offload_activations)
            plans, seconds, inputs = {}, {}, None
            if ckpt is not None and ckpt.done:
                start = ckpt.done
                plans = ckpt.restore(adapter, materialize=not stream)
                if start < adapter.num_layers:
                    inputs = ckpt.load_inputs(mmap=cfg.offload_activations is not None)
                log.info("resuming from %s: layers 0..%d are done", ckpt.folder, start - 1)
            try:
                if start < adapter.num_layers:
                    result = run_layerwise(
                        adapter, calib, method, widths, spaces, device, cfg.batch_size, cfg.propagate,
                        progress=progress, start_layer=start, inputs=inputs,
                        on_layer_done=ckpt.commit if ckpt is not None else None, store=store,
                    )
                    plans.update(result.plans)
                    seconds = result.seconds
            except StorageError:
                raise
            except SlimGPTError:
                if ckpt is not None:
                    ckpt.discard()  # a resume would fail the same way: leave nothing behind
                raise
            except KeyboardInterrupt:
                if ckpt is not None and ckpt.done:
                    log.warning("interrupted: %d of %d layers are saved in %s; rerun the same command with "
                                "--resume to continue", ckpt.done, adapter.num_layers, ckpt.folder)
                raise
            finally:
                store.close()
            io_seconds = store.seconds
            t1 = time.perf_counter()
            pruned = None if stream else shrink_model(model, {})  # every layer is cut already
        t_surgery = time.perf_counter() - t1
        t_prune = t1 - t0
    shaped = pruned if pruned is not None else model  # a streamed model: meta tensors in their final shapes
    if pruned is not None:
        pruned.eval()
    pruned_params = parameter_count(shaped)
    shapes = layer_shapes(shaped)
    layers = []
    for i, s in enumerate(spaces):
        st = plans[i].stats if i in plans else {}
        kept = shapes[i]["heads"] * s.per_q_head + shapes[i]["kv_heads"] * s.per_kv_head + shapes[i]["channels"] * s.per_channel
        layers.append({
            "layer": i, "schedule_ratio": round(widths[i].ratio, 4) if widths else None,
            "heads": f"{shapes[i]['heads']}/{s.num_heads}", "kv_heads": f"{shapes[i]['kv_heads']}/{s.num_kv_heads}",
            "channels": f"{shapes[i]['channels']}/{s.channels}",
            "params_kept": round(kept / s.params, 4),
            **{k: v for k, v in st.items() if k.endswith(("error", "damp", "groups"))},
        })
    secs = seconds
    report = {
        "slimgpt_version": __version__,
        "config": cfg.to_dict(),
        "method": method.config(),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "calibration": calib_info,
        "params": {
            "dense": dense_params, "pruned": pruned_params,
            "removed_ratio": 1 - pruned_params / dense_params, "target_ratio": None if cfg.blocks else cfg.ratio,
            "target_blocks": cfg.blocks,
        },
        "time_s": {
            "load": t_loaded - t_start, "prune_total": t_prune,
            "calibration_forward": secs.get("forward", 0.0), "hessian": secs.get("hessian", 0.0),
            "solver": secs.get("solver", 0.0), "surgery": t_surgery,
            "solver_over_forward": secs.get("solver", 0.0) / max(secs.get("forward", 1e-9), 1e-9),
            "stream_read": io_seconds.get("load", 0.0), "checkpoint_write": io_seconds.get("write", 0.0),
        },
        "streamed": stream,
        "resumed_from_layer": start,
        "memory": mem.as_dict(),
        "layers": layers,
    }
    out = None
    if cfg.out is not None:
        try:
            if stream:
                assert ckpt is not None and source is not None
                out = streaming.save_streamed(adapter, tokenizer, source, ckpt, cfg.out, report, cfg.overwrite, dtype)
            else:
                out = save_pruned(pruned, tokenizer, cfg.out, metadata=report, overwrite=cfg.overwrite)
        except OSError as e:
            raise storage_error(e, cfg.out, ckpt) from e
        if ckpt is not None:
            ckpt.finish()
        if not layerwise and ctx.journal is not None:
            ctx.journal.discard()
    return PruneResult(pruned, tokenizer, report, out)


def _check_architecture(folder: Path) -> None:
    """Refuse an architecture without an adapter from its config.json alone."""
    import json

    from slimgpt.arch import ADAPTERS
    from slimgpt.errors import ModelError

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
    except (OSError, ValueError, AttributeError):
        return  # missing or unreadable: loading says so in one line
    if model_type not in ADAPTERS:
        raise ModelError(
            f"architecture '{model_type}' is not supported yet (supported: {', '.join(sorted(ADAPTERS))}); "
            "add an adapter in src/slimgpt/arch/"
        )


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
        f"solver {t['solver']:.1f} s; solver/forward {t['solver_over_forward']:.2f}), load {t['load']:.1f} s"
    )
    mem = f"peak memory: {m['peak_rss_mib']:.0f} MiB resident"
    if "peak_cuda_mib" in m:
        mem += f", {m['peak_cuda_mib']:.0f} MiB CUDA"
    rows.append(mem)
    return "\n".join(rows)
