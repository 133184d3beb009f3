"""The README's method comparison: every registered method on the default model at 20 % and 50 %,
matched parameter counts, WikiText-2 perplexity (seq 128), pruning time and peak memory.

    python benchmarks/compare.py                       # writes benchmarks/results/compare.{json,md}
    python benchmarks/compare.py --quick               # 8×128 calibration, 32 eval windows (smoke run)

Thin wrapper over ``slimgpt compare`` (:func:`slimgpt.compare.run_compare`) with the settings the
README table is made with recorded in one place. On 2 CPU cores the block searches dominate
(BlockPruner costs ``R(R-1)/2`` block passes per removal round): use ``--methods`` to leave them out,
or a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slimgpt.compare import format_table, run_compare
from slimgpt.config import PruneConfig

OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--nsamples", type=int, default=None, help="default: slimgpt prune's CPU/GPU default")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--search-nsamples", type=int, default=None,
                    help="blockpruner: score candidates on the first N calibration windows (default: all)")
    ap.add_argument("--search-dtype", default="auto")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows only (default: all)")
    ap.add_argument("--ppl-seqlen", default="128", help="window length(s), e.g. 128,2048")
    ap.add_argument("--protocol", default="slimgpt", choices=("slimgpt", "gptq"))
    ap.add_argument("--search-budget", default="25m", help="slimgpt@search rows: database + search time budget")
    ap.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. commonsense (default: none)")
    ap.add_argument("--task-limit", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT/compare.json")
    ap.add_argument("--quick", action="store_true", help="8×128 calibration and 32 evaluation windows")
    ap.add_argument("--out", default=str(OUT), help="folder for compare.json / compare.md")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.quick:
        a.nsamples, a.seqlen, a.max_windows = a.nsamples or 8, a.seqlen or 128, a.max_windows or 32
    base = PruneConfig(model=a.model, nsamples=a.nsamples, seqlen=a.seqlen, device=a.device, data_dir=a.data_dir,
                       search_nsamples=a.search_nsamples, search_dtype=a.search_dtype, search_budget=a.search_budget)
    result = run_compare(a.model, a.ratios, a.methods, a.out, base=base, max_windows=a.max_windows,
                         ppl_seqlen=a.ppl_seqlen, ppl_protocol=a.protocol,
                         tasks=a.tasks, task_limit=a.task_limit, resume=a.resume)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
