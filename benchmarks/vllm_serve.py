"""Pruned models served by vLLM itself: same tokens as slimgpt's own model, and the speed-up (issue 32).

    bash scripts/setup_vllm.sh    # once: vLLM's CPU build in .venv-vllm
    slimgpt prune --ratio 0.2 --target vllm --out /tmp/p20     # (and 0.5 -> /tmp/p50)
    python benchmarks/vllm_serve.py --pruned p20=/tmp/p20 --pruned p50=/tmp/p50 \\
        --out benchmarks/results/vllm/smollm2

One command from slimgpt's environment; the vLLM side runs in the vLLM environment's Python
(``--vllm-python``, running ``src/slimgpt/export/vllm_run.py``). Steps:

1. each pruned folder is exported with ``--to vllm`` (the route its shapes allow) and the dense
   model (``--dense``) as a stock folder (the padded export of an unpruned model is the model
   itself, so vLLM runs its own native Llama/Qwen2 code on it);
2. check, float32: greedy tokens of ``--check-prompts`` WikiText-2 prompts (``--data-dir``; else the
   calibration wheel's wiki text) x ``--check-tokens``
   new tokens in vLLM against slimgpt's model in transformers, all equal, and the top-5
   first-token log-probabilities within ``--logprob-tol``;
3. throughput, same engines still loaded: ``--speed-prompts`` prompts x ``--speed-tokens`` new
   tokens (``ignore_eos``) in one ``generate`` call, after an untimed warm-up, measured
   ``--repeats`` times alternating (dense, p20, p50, dense, p20, p50, ...); tokens/s and the
   pruned/dense ratio of the means.

Writes ``OUT.json`` and ``OUT.md`` (versions of both environments, threads, CPU, routes, shapes).
A tiny trial: ``--check-prompts 2 --check-tokens 4 --speed-prompts 2 --speed-tokens 8 --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimgpt.data.corpora import wiki_documents, wikitext2_test_text
from slimgpt.errors import DataError
from slimgpt.export import export
from slimgpt.export.vllm import read_note
from slimgpt.surgery import parameter_count
from slimgpt.zoo import load_model, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "src" / "slimgpt" / "export" / "vllm_run.py"


def prompt_text(data_dir: str | None) -> tuple[str, str]:
    """WikiText-2 test text (``--data-dir`` / ``$SLIMGPT_DATA``), else the calibration wheel's wiki text."""
    try:
        return wikitext2_test_text(data_dir)[0], "wikitext-2 test"
    except DataError:
        docs, _ = wiki_documents(data_dir)
        return "\n\n".join(docs), "wiki (calibration wheel)"


def prompts_from_text(text: str, tok, n: int, length: int, offset: int = 0) -> list[list[int]]:
    """``n`` consecutive ``length``-token windows of ``text`` (starting after ``offset`` windows)."""
    ids = tok(text[: 20 * length * (n + offset)])["input_ids"]
    if len(ids) < (n + offset) * length:
        raise SystemExit(f"not enough text for {n} prompts of {length} tokens")
    return [ids[(offset + i) * length:(offset + i + 1) * length] for i in range(n)]


@torch.no_grad()
def reference(model, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """slimgpt's model in transformers: greedy tokens (no early stop) and first-token log-probs."""
    rows = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        rows.append({"tokens": out[0, len(p):].tolist(),
                     "logprobs": torch.log_softmax(model(ids).logits[0, -1].double(), -1)})
    return rows


def compare(got: list[dict], ref: list[dict]) -> dict:
    equal = sum(g["tokens"] == r["tokens"] for g, r in zip(got, ref))
    tokens_equal = sum(a == b for g, r in zip(got, ref) for a, b in zip(g["tokens"], r["tokens"]))
    diff = max(abs(lp - float(r["logprobs"][int(t)])) for g, r in zip(got, ref) for t, lp in g["first_logprobs"].items())
    first_div = [next((i for i, (a, b) in enumerate(zip(g["tokens"], r["tokens"])) if a != b), None)
                 for g, r in zip(got, ref)]
    return {"prompts_all_equal": equal, "prompts": len(ref), "tokens_equal": tokens_equal,
            "tokens": sum(len(r["tokens"]) for r in ref), "max_first_logprob_diff": diff,
            "first_divergence": first_div}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="smollm2-135m", help="the unpruned model (zoo name or folder)")
    ap.add_argument("--pruned", action="append", default=[], metavar="NAME=DIR",
                    help="a pruned folder (e.g. made with --target vllm); repeat for several")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                    help="Python of the vLLM environment (scripts/setup_vllm.sh)")
    ap.add_argument("--work", default="/tmp/slimgpt-vllm-serve", help="where the exported folders go")
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--logprob-tol", type=float, default=1e-3)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (check and speed)")
    ap.add_argument("--speed-prompts", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per model, alternating between models")
    ap.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile: faster start, slower decode)")
    ap.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ (default $SLIMGPT_DATA)")
    ap.add_argument("--out", default="benchmarks/results/vllm/smollm2")
    a = ap.parse_args(argv)
    if not a.pruned:
        ap.error("give at least one --pruned NAME=DIR")
    if not Path(a.vllm_python).is_file():
        raise SystemExit(f"no vLLM Python at {a.vllm_python}; run bash scripts/setup_vllm.sh or pass --vllm-python")
    pruned = dict(p.split("=", 1) for p in a.pruned)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. slimgpt's models and their exports
    dense, tok = load_model(a.dense)
    models = {"dense": dense}
    folders = {"dense": export(dense, tok, "padded", work / "dense", overwrite=True)}
    impl = {"dense": "auto"}
    info: dict[str, dict] = {"dense": {"source": str(resolve_model(a.dense)), "route": "native (stock folder)",
                                       "params": parameter_count(dense)}}
    for name, path in pruned.items():
        model, _ = load_model(path)
        models[name] = model
        folders[name] = export(model, tok, "vllm", work / name, overwrite=True)
        note = read_note(folders[name])
        impl[name] = "transformers" if note["route"] == "transformers" else "auto"
        info[name] = {"source": str(Path(path).resolve()), "route": note["route"], "serve": note["serve"],
                      "params": parameter_count(model), "layer_shapes": note["layer_shapes"]}
        print(f"{name}: {note['route']} route, {info[name]['params']:,} parameters -> {folders[name]}", flush=True)

    # 2. prompts and slimgpt's own answers
    text, source = prompt_text(a.data_dir)
    check_prompts = prompts_from_text(text, tok, a.check_prompts, a.prompt_tokens)
    speed_prompts = prompts_from_text(text, tok, a.speed_prompts, a.prompt_tokens, offset=a.check_prompts)
    refs = {name: reference(m, check_prompts, a.check_tokens) for name, m in models.items()}

    # 3. vLLM: load all, check, then time alternating
    names = list(folders)
    spec = {"models": {n: {"path": str(folders[n]), "model_impl": impl[n]} for n in names},
            "dtype": "float32", "max_model_len": a.prompt_tokens + max(a.check_tokens, a.speed_tokens) + 8,
            "max_num_seqs": max(a.speed_prompts, a.check_prompts), "enforce_eager": a.eager,
            "check": {"prompts": check_prompts, "max_tokens": a.check_tokens, "logprobs": 5},
            "speed": {"prompts": speed_prompts, "max_tokens": a.speed_tokens, "order": names * a.repeats}}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
           "VLLM_CPU_KVCACHE_SPACE": a.kv_cache_gib}
    env.pop("PYTHONPATH", None)
    print(f"vLLM: {len(names)} engines, check {a.check_prompts}x{a.check_tokens}, "
          f"speed {a.speed_prompts}x{a.speed_tokens} x{a.repeats} ...", flush=True)
    with open(work / "vllm.log", "w") as log:
        subprocess.run([a.vllm_python, str(RUNNER), str(work / "spec.json"), str(work / "vllm.json")],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    got = json.loads((work / "vllm.json").read_text())

    checks = {}
    for n in names:
        if "error" in got["models"][n]:
            raise SystemExit(f"{n}: vLLM failed: {got['models'][n]['error']} (log: {work / 'vllm.log'})")
        checks[n] = compare(got["models"][n]["check"], refs[n])
        checks[n]["passed"] = (checks[n]["prompts_all_equal"] == checks[n]["prompts"]
                               and checks[n]["max_first_logprob_diff"] < a.logprob_tol)
    runs = got["speed"]
    mean = {n: sum(r["tokens_per_s"] for r in runs if r["model"] == n) / a.repeats for n in names}
    result = {
        "what": "vLLM serving of slimgpt-pruned models: tokens vs slimgpt (transformers), throughput vs dense",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "slimgpt_commit": git_commit(),
        "slimgpt_side": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "vllm_side": got["versions"], "vllm_env": got["env"], "cpu": cpu_name(), "cpu_count": got["cpu_count"],
        "settings": {k: getattr(a, k) for k in ("check_prompts", "check_tokens", "logprob_tol", "prompt_tokens",
                                                "speed_prompts", "speed_tokens", "repeats", "kv_cache_gib",
                                                "eager")},
        "prompts_from": source, "dtype": "float32", "models": info, "load_s": {n: got["models"][n]["load_s"] for n in names},
        "check": checks, "speed_runs": runs,
        "tokens_per_s": mean, "speedup_vs_dense": {n: mean[n] / mean["dense"] for n in names},
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    md = markdown(result, names)
    tmp = out.with_suffix(".md.partial")
    tmp.write_text(md)
    os.replace(tmp, out.with_suffix(".md"))
    print(md)


def markdown(r: dict, names: list[str]) -> str:
    s = r["settings"]
    lines = [f"# vLLM serving (vllm {r['vllm_side']['vllm']}, CPU, float32)", "",
             f"`{r['command']}`  ", f"commit {r['slimgpt_commit']}; {r['cpu']} ({r['cpu_count']} CPUs); "
             f"VLLM_CPU_OMP_THREADS_BIND={r['vllm_env'].get('VLLM_CPU_OMP_THREADS_BIND')}, "
             f"KV cache {s['kv_cache_gib']} GiB", "",
             f"Check: {s['check_prompts']} prompts ({r['prompts_from']}) x {s['check_tokens']} greedy tokens, vLLM against "
             f"slimgpt's model in transformers; speed: {s['speed_prompts']} prompts of {s['prompt_tokens']} tokens "
             f"x {s['speed_tokens']} new tokens, {s['repeats']} runs per model alternating.", "",
             "| model | route | parameters | prompts equal | max first-token log-prob diff | tokens/s (runs) | "
             "vs dense |", "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        c = r["check"][n]
        runs = ", ".join(f"{x['tokens_per_s']:.1f}" for x in r["speed_runs"] if x["model"] == n)
        lines.append(f"| {n} | {r['models'][n]['route']} | {r['models'][n]['params']:,} | "
                     f"{c['prompts_all_equal']}/{c['prompts']} | {c['max_first_logprob_diff']:.1e} | "
                     f"{r['tokens_per_s'][n]:.1f} ({runs}) | {r['speedup_vs_dense'][n]:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
