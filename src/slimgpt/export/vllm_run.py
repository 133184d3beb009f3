"""Run folders in vLLM and report what it computed, for the opt-in test and ``benchmarks/vllm_serve.py``.

This file is run as a script by the *vLLM* environment's Python (``scripts/setup_vllm.sh`` builds
it; it has its own torch and transformers), never imported by slimgpt: it imports only the
standard library and vLLM. Usage::

    .venv-vllm/bin/python src/slimgpt/export/vllm_run.py SPEC.json RESULT.json

``SPEC.json``::

    {"models": {"name": {"path": "...", "model_impl": "auto" | "transformers"}, ...},
     "dtype": "float32", "max_model_len": 512, "enforce_eager": false,
     "check": {"prompts": [[token ids], ...], "max_tokens": 32, "logprobs": 5},
     "speed": {"prompts": [[token ids], ...], "max_tokens": 128, "order": ["dense", "pruned", "dense", "pruned"]}}

Every model is loaded once and kept (engines side by side), so the timed runs can alternate.
``check`` (optional): greedy tokens of each prompt and the top-``logprobs`` log-probabilities of
its first generated token. ``speed`` (optional): one untimed warm-up per model, then each entry of
``order`` generates ``max_tokens`` new tokens for every prompt (``ignore_eos``) and is timed.
``RESULT.json``: ``{"versions": {...}, "models": {name: {"check": [...], "load_s": ...}},
"speed": [{"model", "seconds", "tokens", "tokens_per_s"}, ...]}``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    result: dict = {"versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__},
                    "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                                           "OMP_NUM_THREADS")},
                    "cpu_count": os.cpu_count(), "models": {}, "speed": []}
    check = spec.get("check")
    speed = spec.get("speed")

    def prompts(ids_list: list[list[int]]) -> list[dict]:
        return [{"prompt_token_ids": ids} for ids in ids_list]

    engines = {}
    for name, m in spec["models"].items():
        kw = dict(model=m["path"], dtype=spec.get("dtype", "float32"), trust_remote_code=True,
                  max_model_len=spec.get("max_model_len", 512), skip_tokenizer_init=True, seed=0,
                  max_num_seqs=spec.get("max_num_seqs", 32), enforce_eager=spec.get("enforce_eager", False))
        if m.get("model_impl", "auto") != "auto":
            kw["model_impl"] = m["model_impl"]
        result["models"][name] = {"path": m["path"], "model_impl": m.get("model_impl", "auto")}
        start = time.perf_counter()
        try:
            llm = LLM(**kw)
        except Exception as e:  # noqa: BLE001 - recorded; the other models still run
            result["models"][name]["error"] = f"{type(e).__name__}: {e}"[:4000]
            continue
        result["models"][name]["load_s"] = time.perf_counter() - start
        if check:
            params = SamplingParams(temperature=0.0, max_tokens=check["max_tokens"], logprobs=check.get("logprobs", 5),
                                    detokenize=False, ignore_eos=True)
            rows = []
            for out in llm.generate(prompts(check["prompts"]), params, use_tqdm=False):
                o = out.outputs[0]
                first = o.logprobs[0] if o.logprobs else {}
                rows.append({"tokens": list(o.token_ids),
                             "first_logprobs": {str(t): lp.logprob for t, lp in first.items()}})
            result["models"][name]["check"] = rows
        if speed and name in speed["order"]:
            engines[name] = llm  # kept: the timed runs alternate between engines
        else:
            _close(llm)

    speed = spec.get("speed")
    if speed:
        params = SamplingParams(temperature=0.0, max_tokens=speed["max_tokens"], ignore_eos=True, detokenize=False)
        warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
        for llm in engines.values():
            llm.generate(prompts(speed["prompts"][:2]), warm, use_tqdm=False)
        for name in speed["order"]:
            start = time.perf_counter()
            outs = engines[name].generate(prompts(speed["prompts"]), params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            result["speed"].append({"model": name, "seconds": seconds, "tokens": tokens,
                                    "tokens_per_s": tokens / seconds})

    for llm in engines.values():
        _close(llm)
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(result_path + ".tmp", result_path)


def _close(llm) -> None:
    """Stop an engine's worker processes now (one model at a time keeps the memory of one)."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the process exit cleans up as well
        pass
    del llm
    gc.collect()


if __name__ == "__main__":  # vLLM's engine processes re-import the main module: the guard is required
    # run as a script, this file's folder leads sys.path, where vllm.py / gguf.py / onnx.py would shadow packages
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main(*sys.argv[1:3])
