"""WikiText-2 perplexity of dense and pruned models under both window protocols and lengths.

The README's SlimGPT table reports seq 128 with the ``slimgpt`` protocol (BOS in every window);
papers also report seq 2048 (BlockPruner, SliceGPT) and cut windows from one tokenised stream
(the ``gptq`` protocol). This evaluates each model at every (protocol, seqlen) pair on the same
number of tokens per cell (``--tokens``; ``0`` = the whole test set) and writes JSON + Markdown.
Perplexities do not depend on machine load; the times recorded do.

    slimgpt prune --ratio 0.2 --out p20 --data-dir ../shared/data     # and 0.5 → p50 (deterministic)
    python benchmarks/ppl_protocols.py --models smollm2-135m,p20,p50 --labels dense,"slimgpt 20%","slimgpt 50%" \
        --data-dir ../shared/data --out benchmarks/results/ppl_protocols_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from slimgpt.evaluation.perplexity import perplexity
from slimgpt.surgery import parameter_count
from slimgpt.zoo import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated zoo names or folders")
    ap.add_argument("--labels", help="comma-separated labels (default: the names)")
    ap.add_argument("--seqlens", default="128,2048")
    ap.add_argument("--protocols", default="slimgpt,gptq")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per cell (0: the whole test set)")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="benchmarks/results/ppl_protocols_smollm2")
    a = ap.parse_args()

    names = a.models.split(",")
    labels = a.labels.split(",") if a.labels else names
    seqlens = [int(s) for s in a.seqlens.split(",")]
    protocols = a.protocols.split(",")
    rows = []
    for label, name in zip(labels, names):
        model, tok = load_model(name)
        row = {"label": label, "model": name, "params": parameter_count(model), "ppl": {}}
        for protocol in protocols:
            for s in seqlens:
                windows = a.tokens // s if a.tokens else None
                t = time.perf_counter()
                r = perplexity(model, tok, "wikitext2", seqlen=s, max_windows=windows, data_dir=a.data_dir,
                               protocol=protocol)
                row["ppl"][f"{protocol}/{s}"] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"],
                                                 "protocol": r["protocol"], "dataset": r["dataset"],
                                                 "eval_s": time.perf_counter() - t}
                print(f"{label} {protocol} seq {s}: {r['ppl']:.2f} ({r['windows']} windows)", flush=True)
        rows.append(row)
        del model
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
            "tokens_per_cell": a.tokens or "all", "load_average": os.getloadavg(),
            "command": " ".join(__import__("sys").argv)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    cells = [f"{p}/{s}" for p in protocols for s in seqlens]
    lines = ["| model | params | " + " | ".join(f"PPL seq {c.split('/')[1]} ({c.split('/')[0]})" for c in cells) + " |",
             "|---|---:|" + "---:|" * len(cells)]
    for row in rows:
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f}M | "
                     + " | ".join(f"{row['ppl'][c]['ppl']:.2f}" for c in cells) + " |")
    first = rows[0]["ppl"]
    lines.append("\nWindows per cell: " + ", ".join(f"{c}: {first[c]['windows']}" for c in cells)
                 + f" (about {a.tokens or 'all'} tokens each).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
