"""Where the FFN solve of one layer spends its time and memory at real widths (issue #23).

A synthetic Hessian ``H = 2 X Xᵀ / n`` from ``--tokens`` random correlated activations of width
``--width`` (Llama-3.1-8B: 14,336; 70B: 28,672) and a random ``down_proj`` of ``--rows`` rows; then
the steps SlimGPT runs on them, each timed, with the process's peak resident memory (or the CUDA
allocator's peak) after each:

    hessian   the float64 accumulation of ``x xᵀ`` over the tokens in batches, and its finalize
    inverse   :func:`slimgpt.solvers.hessian.damped_inverse` (Cholesky, inverse)
    channels  :func:`slimgpt.solvers.channels.prune_channels` with Dynamic Group Size, removing
              ``--remove`` of the columns (0.68: what ``--ratio 0.2`` takes from the layers of
              Llama-3.1-8B cut to 2 layers without per-layer ratios, the issue's run)

    python benchmarks/solver_profile.py --width 14336 --rows 4096 --tokens 4096 --remove 0.68
    python benchmarks/solver_profile.py --width 2048 --json /tmp/p.json        # seconds, not minutes

Prints (and with ``--json`` writes) the seconds per step, the memory held before it and the peak
above that, in MiB and in ``F × F`` float32 buffers (resident memory on CPU, sampled every 20 ms,
after returning freed heap pages; the allocator's peak on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from slimgpt.solvers.channels import prune_channels
from slimgpt.solvers.hessian import HessianAccumulator, damped_inverse, dead_columns
from slimgpt.streaming import _trim_heap
from slimgpt.utils import PeakMemory, rss_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=14336, help="FFN width F (down_proj columns)")
    ap.add_argument("--rows", type=int, default=4096, help="down_proj rows (the hidden size)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind the synthetic Hessian")
    ap.add_argument("--batch", type=int, default=2048, help="tokens per accumulation step")
    ap.add_argument("--remove", type=float, default=0.68, help="share of the columns removed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    F, base = a.width, rss_bytes()
    out: dict = {"width": F, "rows": a.rows, "tokens": a.tokens, "remove": a.remove, "device": str(dev),
                 "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                 "fxf_fp32_mib": F * F * 4 / 2**20, "base_rss_mib": base / 2**20, "steps": {}}
    mix = torch.randn(256, F, generator=g) / 16  # shared directions: a correlated, ill-conditioned H

    def step(name: str, fn):
        _trim_heap()  # freed heap pages back to the system: RSS then counts live buffers
        before = rss_bytes() if dev.type == "cpu" else torch.cuda.memory_allocated(dev)
        mem = PeakMemory(dev)
        with mem.track():
            t = time.perf_counter()
            r = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            secs = time.perf_counter() - t
        peak = (mem.peak_cuda if dev.type == "cuda" else mem.peak_rss) - before
        held = before - (base if dev.type == "cpu" else 0)
        fxf = F * F * 4
        out["steps"][name] = {"seconds": round(secs, 2), "held_before_mib": round(held / 2**20, 1),
                              "peak_extra_mib": round(peak / 2**20, 1), "peak_extra_fxf_fp32": round(peak / fxf, 2)}
        print(f"{name:9s} {secs:8.2f} s  held before {held / fxf:5.2f}, peak extra {peak / fxf:5.2f} F×F fp32 "
              f"({peak / 2**20:.0f} MiB)", flush=True)
        return r

    def hessian() -> torch.Tensor:
        acc = HessianAccumulator(F, device=dev, sum_dtype=torch.float64)
        for s in range(0, a.tokens, a.batch):
            n = min(a.batch, a.tokens - s)
            x = torch.randn(n, F, generator=g) + torch.randn(n, 256, generator=g) @ mix
            acc.add(torch.nn.functional.silu(x).to(dev))
        return acc.finalize()

    H = step("hessian", hessian)
    W = (torch.randn(a.rows, F, generator=g) / F**0.5).to(dev)
    Hinv, lam = step("inverse", lambda: damped_inverse(H, 0.01))
    res = step("channels", lambda: prune_channels(W, Hinv, int(a.remove * F), dead=dead_columns(H)))
    out["groups"] = res.group_sizes
    out["damp"] = lam
    out["total_s"] = round(sum(s["seconds"] for k, s in out["steps"].items() if k != "hessian"), 2)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
