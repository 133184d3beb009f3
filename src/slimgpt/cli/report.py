"""``slimgpt report``: Markdown report with plots of a pruned folder."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a pruned folder (written by slimgpt prune; holds slimgpt.json)")
    p.add_argument("--out", help="where report.md and the PNGs go (default: RUN_DIR)")
    p.add_argument("--dense", help="the dense model for the per-layer error plot (default: slimgpt.json's model)")
    p.add_argument("--error-data", default="auto",
                   help="held-out text for the per-layer error: auto (WikiText-2 when available, else a named held-out "
                        "text) | wikitext2 | wiki | c4 | FILE")
    p.add_argument("--error-windows", type=int, default=8, help="windows of that text (paper Fig. 2 style)")
    p.add_argument("--error-seqlen", type=int, default=128, help="tokens per window")
    p.add_argument("--no-layer-error", action="store_true", help="skip the per-layer error (no dense model needed)")
    p.add_argument("--eval-json", action="append", help="eval JSON(s) to plot (default: RUN_DIR/*.json of eval kind)")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default $SLIMGPT_DATA)")


def run(a: argparse.Namespace) -> int:
    """Markdown report with plots of a pruned folder: per-layer ratios and errors, PPL/accuracy."""
    from pathlib import Path

    from slimgpt.preflight import check_writable

    check_writable(Path(a.out or a.run_dir) / "report.md", "--out")  # before the dense model is loaded
    if a.dense and not a.no_layer_error:
        from slimgpt.preflight import check_model

        check_model(a.dense)
    from slimgpt.report import write_report

    path = write_report(
        a.run_dir, out_dir=a.out, dense=a.dense, error_data=a.error_data, error_windows=a.error_windows,
        error_seqlen=a.error_seqlen, layer_error=not a.no_layer_error, eval_jsons=a.eval_json, data_dir=a.data_dir,
    )
    print(f"report: {path}")
    return 0
