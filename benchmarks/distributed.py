"""Data-parallel pruning under torchrun: 1 process against N processes, one torch thread each.

Each run is a fresh ``slimgpt prune`` (N = 1: ``python -m slimgpt``; N > 1: ``torchrun
--nproc_per_node=N -m slimgpt``) with ``OMP_NUM_THREADS=1``, so N processes use N cores and one
process one. Recorded: the calibration forward + Hessian time and the whole pruning time from each
run's ``slimgpt.json`` (rank 0's clocks), the command's wall time, and the ratios 1-process / N.
Then every pruned model is scored by the same single-process perplexity evaluation, and the
weights are compared with the 1-process model: the kept heads/channels (sliced tensors bitwise
equal) and the largest relative difference of the compensated ones (Hessians summed in another
order). The machine's load average is recorded before and after: on a shared machine the times
are only indicative.

    python benchmarks/distributed.py                      # smollm2-135m, 20 %, 1 and 2 processes
    python benchmarks/distributed.py --procs 1,2,4 --nsamples 128

Writes ``--json`` (default ``benchmarks/results/distributed_smollm2.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slimgpt.io import saved_tensors

SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "norm", "embed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prune_command(n: int, model: str, out: Path, extra: list[str]) -> list[str]:
    """The exact launch line: plain ``python -m slimgpt`` for one process, torchrun for more."""
    cli = ["prune", model, "--out", str(out), "--device", "cpu", *extra]
    if n == 1:
        return [sys.executable, "-m", "slimgpt", *cli]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}"]
    return [*torchrun, "-m", "slimgpt", *cli]


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return {"wall_s": round(wall, 1), "command": " ".join(["OMP_NUM_THREADS=1", *cmd])}


def compare_weights(ref: Path, got: Path) -> dict:
    """Same kept structure (sliced tensors equal) and the worst relative difference elsewhere."""
    a, b = saved_tensors(ref), saved_tensors(got)
    same_structure = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    sliced_equal = same_structure and all(torch.equal(a[k], b[k]) for k in a if any(s in k for s in SLICED))
    worst, where = 0.0, ""
    if same_structure:
        for k in a:
            rel = ((a[k] - b[k]).float().norm() / a[k].float().norm().clamp_min(1e-30)).item()
            if rel > worst:
                worst, where = rel, k
    return {"same_kept_heads_and_channels": bool(sliced_equal), "max_relative_frobenius_diff": worst,
            "max_diff_tensor": where, "bitwise_equal": same_structure and all(torch.equal(a[k], b[k]) for k in a)}


def perplexity_of(folder: Path, windows: int, data_dir: str | None) -> dict:
    from slimgpt.evaluation.perplexity import perplexity
    from slimgpt.io import load_pruned

    torch.set_num_threads(2)
    model, tok = load_pruned(folder)
    r = perplexity(model, tok, "auto", seqlen=128, max_windows=windows, data_dir=data_dir, progress=False)
    return {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"], "dataset": r["dataset"]["label"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--procs", default="1,2", help="process counts; the first is the reference")
    p.add_argument("--nsamples", type=int, help="calibration windows (default: the CPU default, 64)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default: the CPU default, 512)")
    p.add_argument("--ppl-windows", type=int, default=64, help="perplexity windows of 128 tokens per model")
    p.add_argument("--data-dir", default=os.environ.get("SLIMGPT_DATA"))
    p.add_argument("--json", default="benchmarks/results/distributed_smollm2.json")
    a = p.parse_args()

    procs = [int(x) for x in a.procs.split(",")]
    extra = ["--ratio", a.ratio]
    extra += ["--nsamples", str(a.nsamples)] if a.nsamples else []
    extra += ["--seqlen", str(a.seqlen)] if a.seqlen else []
    work = Path(tempfile.mkdtemp(prefix="slimgpt-dist-"))
    result: dict = {"model": a.model, "ratio": float(a.ratio), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "threads_per_process": 1,
                    "load_average_before": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared 2-core machine (other engineers' jobs ran alongside): times are indicative",
                    "runs": []}
    try:
        for n in procs:
            out = work / f"n{n}"
            r = run(prune_command(n, a.model, out, extra))
            rep = json.loads((out / "slimgpt.json").read_text())
            t = rep["time_s"]
            r.update(processes=n, reported_processes=rep.get("processes", 1),
                     calibration_windows=rep["config"]["nsamples"], calibration_seqlen=rep["config"]["seqlen"],
                     forward_plus_hessian_s=round(t["calibration_forward"] + t["hessian"], 2),
                     forward_s=round(t["calibration_forward"], 2), hessian_s=round(t["hessian"], 2),
                     solver_s=round(t["solver"], 2), communication_s=round(t.get("communication", 0.0), 2),
                     prune_total_s=round(t["prune_total"], 2), load_s=round(t["load"], 2),
                     removed_ratio=rep["params"]["removed_ratio"],
                     load_average_after=[round(x, 2) for x in os.getloadavg()])
            result["runs"].append(r)
            print(f"{n} process(es): forward+Hessian {r['forward_plus_hessian_s']} s, pruning {r['prune_total_s']} s, "
                  f"wall {r['wall_s']} s", flush=True)
        ref = result["runs"][0]
        for r in result["runs"]:
            folder = work / f"n{r['processes']}"
            r["perplexity"] = perplexity_of(folder, a.ppl_windows, a.data_dir)
            r["vs_first"] = compare_weights(work / f"n{ref['processes']}", folder)
            r["speedup_forward_plus_hessian"] = round(ref["forward_plus_hessian_s"] / r["forward_plus_hessian_s"], 2)
            r["speedup_prune_total"] = round(ref["prune_total_s"] / r["prune_total_s"], 2)
            r["speedup_wall"] = round(ref["wall_s"] / r["wall_s"], 2)
            print(f"{r['processes']}: ppl {r['perplexity']['ppl']:.4f}, speedup forward+Hessian "
                  f"{r['speedup_forward_plus_hessian']}x, pruning {r['speedup_prune_total']}x; {r['vs_first']}",
                  flush=True)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
