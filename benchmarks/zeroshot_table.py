"""One Markdown table from several ``slimgpt eval --json`` files (the README's zero-shot table).

    python benchmarks/zeroshot_table.py benchmarks/results/zeroshot/p20.json benchmarks/results/zeroshot/p50.json \
        --out benchmarks/results/zeroshot/zeroshot.md

Rows are the files' models in order (a pruned model is named by its folder); cells are
lm-eval's accuracies with their standard errors, as ``slimgpt eval`` prints them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimgpt.evaluation.results import zeroshot_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", help="write the table here too")
    a = ap.parse_args(argv)
    entries = []
    for f in a.files:
        for m in json.loads(Path(f).read_text())["models"]:
            name = "dense" if m["label"] == "dense" else Path(m["model"]).name
            entries.append({**m, "label": f"{name} ({m['params'] / 1e6:.1f}M params)"})
    table = zeroshot_table(entries)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
