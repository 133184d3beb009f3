"""Inference speed and memory of dense vs pruned models, measured side by side in one run.

Structured pruning is only worth its accuracy cost if the smaller model runs faster with stock
code; the paper's Table 4 reports per-token latency and memory of pruned LLaMA-7B with up to 512
generated tokens. This module measures, for each model in the same process and on the same prompt:

* **prefill latency**: one forward pass over the prompt with the KV cache on (what the first
  token costs);
* **decode**: greedy ``generate`` with ``min_new_tokens = max_new_tokens = new_tokens`` (so EOS
  cannot end a run early) and the KV cache on. A streamer time-stamps every generated token, so
  the decode time is the span from the first to the last generated token, *inside* the same
  ``generate`` call: ``(new_tokens - 1)`` incremental steps, free of prefill and set-up cost.
  The per-token latency (ms) is the paper's "Latency" column; tokens/s is its inverse;
* **memory**: on CUDA, the peak allocated during the run *minus what was allocated before it*
  (other models resident on the GPU do not count) *plus this model's own weights*, i.e. the
  footprint the model would have alone. On CPU there is no resettable peak for a torch process
  (``VmHWM`` only grows, tracemalloc does not see torch's allocator), so we report what can be
  measured exactly instead: weight bytes and the KV cache bytes of the returned cache.

Repeats are interleaved across models (repeat 1 of every model, then repeat 2, ...) so that load
from other processes on a shared machine spreads over all models instead of biasing one; each
metric is the median over repeats, and the raw per-repeat numbers are kept. Speed-ups are relative
to the first model, which should be the dense one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from slimgpt.defaults import TABLE4_NEW_TOKENS as TABLE4_NEW_TOKENS  # re-exported
from slimgpt.errors import ConfigError

_PROMPT_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, "
    "and practical knowledge about the natural world, produced by scientists who emphasize the "
    "observation, explanation, and prediction of real-world phenomena. "
)


class _TokenClock:
    """A ``generate`` streamer that only records when each batch of tokens arrives.

    ``generate`` calls ``put`` once with the prompt, then once per generated token after copying
    it to the host (a device sync), so the timestamps mark real token completion times.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except StopIteration:
        return "unknown"


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once, as ``model.parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: the resident size of the model itself."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params + buffers


def cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache returned from ``generate`` (``Cache`` objects or legacy tuples).

    Measured from the tensors rather than computed from the config, so a pruned model with
    per-layer head counts (or a layer without attention) is counted as it actually is.
    """
    if cache is None:
        return 0
    seen: set[int] = set()
    total = 0

    def add(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)

    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            add(getattr(layer, "keys", None))
            add(getattr(layer, "values", None))
    else:
        add(cache)
    return total


def make_prompt(tokenizer: Any, prompt_tokens: int) -> torch.Tensor:
    """Exactly ``prompt_tokens`` ids of plain English text (1 × prompt_tokens)."""
    text = _PROMPT_TEXT
    ids: list[int] = []
    for _ in range(64):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= prompt_tokens:
            break
        text = text + " " + _PROMPT_TEXT
    if len(ids) < prompt_tokens:
        raise ConfigError(
            f"tokenizer yields only {len(ids)} tokens for the prompt; use a smaller prompt_tokens"
        )
    return torch.tensor([ids[:prompt_tokens]], dtype=torch.long)


def _ids_for_generate(tokenizer: Any, model: Any) -> dict[str, Any]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {"eos_token_id": eos, "pad_token_id": pad}


@torch.inference_mode()
def _one_run(model: Any, input_ids: torch.Tensor, new_tokens: int, gen_ids: dict[str, Any]) -> dict[str, Any]:
    """One prefill measurement and one full greedy generation of ``new_tokens`` tokens."""
    device = _model_device(model)
    ids = input_ids.to(device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, use_cache=True)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    clock = _TokenClock()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        streamer=clock,
        return_dict_in_generate=True,
        **gen_ids,
    )
    _sync(device)
    generate_s = time.perf_counter() - t0
    generated = int(out.sequences.shape[1] - ids.shape[1])
    if generated != new_tokens or len(clock.times) != new_tokens:
        raise ConfigError(
            f"generate produced {generated} tokens ({len(clock.times)} streamed), expected {new_tokens}: "
            "check the model's generation config (stopping criteria, max_length)"
        )
    run: dict[str, Any] = {
        "prefill_s": prefill_s,
        "generate_s": generate_s,
        "first_token_s": clock.times[0] - t0,
        "decode_s": clock.times[-1] - clock.times[0],
        "kv_cache_bytes": cache_bytes(getattr(out, "past_key_values", None)),
    }
    if device.type == "cuda":
        run["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
    del out
    return run


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def benchmark_generation(
    models: list[tuple[str, Any, Any]],
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Time prefill and greedy decoding of each ``(name, model, tokenizer)`` on one shared prompt.

    The first model is the reference for speed-ups (put the dense model first). ``device`` moves
    every model there (in place) before timing; by default each is timed where it lies. Use
    ``new_tokens=TABLE4_NEW_TOKENS`` for the paper's Table 4 setting. ``num_threads`` sets torch's
    CPU threads for the run only (restored afterwards): on a shared machine, more threads than
    free cores makes every small decode op wait at thread barriers (measured here with SmolLM2 at
    load 4.7 on 2 cores: 2 threads 128 ms/token, 1 thread 60 ms/token). Returns per-model
    medians, the raw per-repeat timings, speed-ups and the run's settings.
    """
    if not models:
        raise ConfigError("benchmark_generation needs at least one (name, model, tokenizer)")
    if prompt_tokens < 1:
        raise ConfigError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be >= 2 (decode speed needs two tokens), got {new_tokens}")
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = [name for name, _, _ in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be distinct, got {names}")

    prepared = []
    for name, model, tokenizer in models:
        if device is not None:
            model.to(device)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise ConfigError(
                f"{name}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        prepared.append(
            (name, model, make_prompt(tokenizer, prompt_tokens), _ids_for_generate(tokenizer, model))
        )

    modes = [bool(m.training) for _, m, _, _ in prepared]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    threads_used = torch.get_num_threads()
    try:
        for _, model, _, _ in prepared:
            model.eval()
        for _ in range(warmup):
            for _, model, ids, gen_ids in prepared:
                _one_run(model, ids, new_tokens, gen_ids)
        for _ in range(repeats):  # interleaved: drift and neighbours' load hit every model alike
            for name, model, ids, gen_ids in prepared:
                runs[name].append(_one_run(model, ids, new_tokens, gen_ids))
    finally:
        torch.set_num_threads(threads_before)
        for (_, model, _, _), mode in zip(prepared, modes):
            model.train(mode)

    per_model: list[dict[str, Any]] = []
    for name, model, _, _ in prepared:
        r = runs[name]
        dev = _model_device(model)
        decode_s = _median([x["decode_s"] for x in r])
        generate_s = _median([x["generate_s"] for x in r])
        w_bytes = weight_bytes(model)
        kv = max(x["kv_cache_bytes"] for x in r)
        entry: dict[str, Any] = {
            "name": name,
            "params": count_parameters(model),
            "device": str(dev),
            "dtype": _model_dtype(model),
            "prefill_ms": 1000 * _median([x["prefill_s"] for x in r]),
            "first_token_ms": 1000 * _median([x["first_token_s"] for x in r]),
            "decode_ms_per_token": 1000 * decode_s / (new_tokens - 1),
            "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s > 0 else float("inf"),
            "generate_tokens_per_s": new_tokens / generate_s,
            "weight_bytes": w_bytes,
            "kv_cache_bytes": kv,
            "peak_memory_bytes": (
                w_bytes + max(x["peak_extra_bytes"] for x in r) if dev.type == "cuda" else None
            ),
            "runs": r,
        }
        per_model.append(entry)

    base = per_model[0]
    for entry in per_model:
        entry["speedup"] = {
            "prefill": base["prefill_ms"] / entry["prefill_ms"],
            "decode": entry["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            "generate": entry["generate_tokens_per_s"] / base["generate_tokens_per_s"],
            "params_ratio": entry["params"] / base["params"],
            "weight_bytes_ratio": entry["weight_bytes"] / base["weight_bytes"],
        }

    any_cuda = any(e["device"].startswith("cuda") for e in per_model)
    return {
        "models": per_model,
        "reference": base["name"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median over repeats (repeats interleaved across models)",
        "torch_threads": threads_used,
        "torch_version": torch.__version__,
        "memory_note": (
            "CUDA peak = this model's weights + (max_memory_allocated during its runs - memory allocated "
            "before them)"
            if any_cuda
            else "CPU: no resettable per-model peak exists for torch; weight_bytes and the KV cache bytes "
            "of the returned cache are reported instead (activations not included)"
        ),
    }


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of one benchmark run, with speed-ups against the reference model."""
    m0 = result["models"][0]
    lines = [
        f"Greedy generation, prompt {result['prompt_tokens']} + {result['new_tokens']} new tokens, "
        f"{result['repeats']} repeats ({result['statistic']}), {m0['device']}, {m0['dtype']}, "
        f"{result['torch_threads']} torch threads; speed-ups vs {result['reference']}",
        "",
        "| model | params (M) | prefill ms | ms/token | decode tok/s | weights MiB | KV MiB | peak MiB "
        "| prefill × | decode × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["models"]:
        lines.append(
            f"| {e['name']} | {e['params'] / 1e6:.2f} | {e['prefill_ms']:.1f} | {e['decode_ms_per_token']:.2f} | "
            f"{e['decode_tokens_per_s']:.1f} | {_mib(e['weight_bytes'])} | {_mib(e['kv_cache_bytes'])} | "
            f"{_mib(e['peak_memory_bytes'])} | {e['speedup']['prefill']:.2f} | {e['speedup']['decode']:.2f} |"
        )
    lines += ["", f"Memory: {result['memory_note']}."]
    return "\n".join(lines)
