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

    python benchmarks/solver_profile.py --width 14336 --rows 4096 --tokens 4096 --remove 0.68 --impl both
    python benchmarks/solver_profile.py --width 2048 --json /tmp/p.json        # seconds, not minutes

``--impl both`` runs the solvers of issue #23 and the unblocked ones they replaced on the same
``H`` and ``W`` (CPU seconds are reported beside wall seconds: on a shared machine they compare
better) and says whether they keep the same channels.

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

from slimgpt.solvers import hessian as hessian_module
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
    ap.add_argument("--impl", default="lean", choices=["lean", "previous", "both"],
                    help="the blocked in-place solvers (lean), the unblocked ones they replaced at this width "
                         "(previous), or both on the same H and W, with the differences of their results")
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
            t, cpu = time.perf_counter(), time.process_time()
            r = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            secs, cpu = time.perf_counter() - t, time.process_time() - cpu
        peak = (mem.peak_cuda if dev.type == "cuda" else mem.peak_rss) - before
        held = before - (base if dev.type == "cpu" else 0)
        fxf = F * F * 4
        out["steps"][name] = {"seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                              "held_before_mib": round(held / 2**20, 1), "peak_extra_mib": round(peak / 2**20, 1),
                              "peak_extra_fxf_fp32": round(peak / fxf, 2)}
        print(f"{name:18s} {secs:8.2f} s ({cpu:7.1f} CPU s)  held before {held / fxf:5.2f}, peak extra "
              f"{peak / fxf:5.2f} F×F fp32 ({peak / 2**20:.0f} MiB)", flush=True)
        return r

    def hessian() -> torch.Tensor:
        acc = HessianAccumulator(F, device=dev, sum_dtype=torch.float64)
        for s in range(0, a.tokens, a.batch):
            n = min(a.batch, a.tokens - s)
            x = torch.randn(n, F, generator=g) + torch.randn(n, 256, generator=g) @ mix
            acc.add(torch.nn.functional.silu(x).to(dev))
        return acc.finalize()

    H = step("hessian", hessian)
    W0 = (torch.randn(a.rows, F, generator=g) / F**0.5).to(dev)
    lean_min = hessian_module.LEAN_MIN_COLS
    results = {}
    for impl in (["lean", "previous"] if a.impl == "both" else [a.impl]):
        hessian_module.LEAN_MIN_COLS = lean_min if impl == "lean" else F + 1
        suffix = "" if a.impl != "both" else f" ({impl})"
        W = W0.clone()
        Hinv, lam = step("inverse" + suffix, lambda: damped_inverse(H, 0.01))
        res = step("channels" + suffix,
                   lambda W=W, Hinv=Hinv: prune_channels(W, Hinv, int(a.remove * F), dead=dead_columns(H)))
        del Hinv
        results[impl] = (res, W)
        out["groups"] = res.group_sizes
        out["damp"] = lam
    hessian_module.LEAN_MIN_COLS = lean_min
    if a.impl == "both":
        (r1, w1), (r2, w2) = results["lean"], results["previous"]
        out["same_kept_channels"] = r1.kept == r2.kept
        out["kept_channels_differing"] = len(set(r1.kept) ^ set(r2.kept))
        out["max_rel_weight_difference"] = float((w1 - w2).abs().max() / w2.abs().max())
        print(f"same kept channels: {out['same_kept_channels']} ({out['kept_channels_differing']} differ); "
              f"largest weight difference {out['max_rel_weight_difference']:.2e} of the largest weight")
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
