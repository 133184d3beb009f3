"""``torchrun --nproc_per_node=N -m slimgpt.recovery ARGS``: ``slimgpt finetune`` data parallel.

The same arguments as ``slimgpt finetune``; every process reads its slice of each global batch and
the gradients are summed over processes (NCCL on GPUs, gloo on CPUs), so N processes with
``--batch-size B`` train what one process does with ``--batch-size N·B``. Rank 0 evaluates, saves
and prints. (``slimgpt finetune`` itself runs under torchrun once ``finetune`` is listed in
``slimgpt.cli.TORCHRUN_SUBCOMMANDS``.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from slimgpt.cli import finetune as command
from slimgpt.errors import SlimGPTError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimgpt.recovery", description=(command.run.__doc__ or "").strip())
    command.add_args(parser)
    args = parser.parse_args(argv)
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return command.run(args)
    except SlimGPTError as e:
        print(f"slimgpt: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
