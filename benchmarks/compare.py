"""The README's method comparison: every registered method on the default model at 20 % and 50 %,
matched parameter counts, WikiText-2 perplexity (seq 128), pruning time and peak memory.

    python benchmarks/compare.py                       # writes benchmarks/results/compare.{json,md}
    python benchmarks/compare.py --quick               # 8×128 calibration, 32 eval windows (smoke run)

``slimgpt compare`` with the benchmark's defaults (``--model``, ``--ratios``, ``--out`` under
``benchmarks/results``, ``--quick``); every other option is the command's own (``slimgpt compare
--help``), so the two cannot drift apart. On 2 CPU cores the block searches dominate (BlockPruner
costs ``R(R-1)/2`` block passes per removal round): use ``--methods`` to leave them out, or a GPU
(``--device cuda``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slimgpt.cli import compare as compare_cli
from slimgpt.config import DEFAULT_MODEL

OUT = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's own flags, then ``slimgpt compare``'s parser for the rest."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other options: slimgpt compare --help")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--quick", action="store_true", help="8×128 calibration and 32 evaluation windows")
    ap.add_argument("--out", default=str(OUT), help="folder for compare.json / compare.md")
    a, rest = ap.parse_known_args(argv)
    quick = ["--nsamples", "8", "--seqlen", "128", "--max-windows", "32"] if a.quick else []
    cli = argparse.ArgumentParser(prog="benchmarks/compare.py")
    compare_cli.add_args(cli)
    return cli.parse_args([a.model, "--ratio", a.ratios, "--out", a.out, *quick, *rest])  # later flags win


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return compare_cli.run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
