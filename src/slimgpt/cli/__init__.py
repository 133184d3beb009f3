"""Command line: ``slimgpt prune | eval | bench | compare | finetune | export | report``.

One module per subcommand, each with ``add_args(parser)`` and ``run(args) -> exit code``; they only
parse arguments and call the library. Any :class:`~slimgpt.errors.SlimGPTError` becomes one line
on stderr and exit code 2; Ctrl-C and SIGTERM say what was saved.

Building the parser imports every subcommand module, so those modules import nothing heavy at
module level (torch and transformers take seconds): ``--help`` and a mistyped option are answered
in about a second. ``run()`` imports what it needs, after its cheap checks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from slimgpt.errors import ConfigError, SlimGPTError

log = logging.getLogger("slimgpt")

SUBCOMMANDS = ("prune", "eval", "bench", "compare", "finetune", "export", "report")
"""Subcommand names, each a module ``slimgpt.cli.<name>`` (a new subcommand: a module and a name here)."""
TORCHRUN_SUBCOMMANDS = ("prune", "eval", "compare")
"""Subcommands that split their calibration/evaluation windows across ``torchrun`` processes."""


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class _HelpFormatter(argparse.HelpFormatter):
    """Show every meaningful default in ``--help`` (argparse's own formatter would also print
    "default: None" on options whose default is decided at run time)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not text or "default" in text or default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] and action.nargs in ("?", "*")):
            return text
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (like every other user error), not usage + error."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="slimgpt", description="Structured pruning of LLMs (SlimGPT, BlockPruner)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"slimgpt.cli.{name}")
        doc = (mod.run.__doc__ or "").strip().splitlines()
        sp = sub.add_parser(name, help=doc[0] if doc else None, formatter_class=_HelpFormatter)
        mod.add_args(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    launched = _launched()
    quiet = launched and os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 speaks for all
    level = logging.DEBUG if args.verbose else logging.ERROR if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    if not args.verbose:
        from slimgpt.lazy import when_imported

        when_imported("transformers", _quiet_transformers)
    terminated = _sigterm_as_interrupt()
    who = f" (rank {os.environ.get('RANK')})" if launched else ""
    try:
        if launched and args.command not in TORCHRUN_SUBCOMMANDS:
            raise ConfigError(f"slimgpt {args.command} does not split its work across torchrun processes; run it "
                              f"without torchrun (under torchrun: {', '.join(TORCHRUN_SUBCOMMANDS)})")
        return args.func(args)
    except SlimGPTError as e:
        print(f"slimgpt: error{who}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        hint = "; finished layers/search rounds are kept beside --out: rerun with --resume" if args.command == "prune" else ""
        print(f"slimgpt: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _restore_sigterm(terminated)


def _launched() -> bool:
    """:func:`slimgpt.distributed.launched` without importing torch (that module needs it)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _quiet_transformers(_module: object) -> None:
    """No "Loading weights" bar on every model load: transformers' own progress bars are off (the
    Hub's download bars stay, a download can take minutes)."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    downloads = not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if downloads:
        hub.enable_progress_bars()


def _restore_sigterm(terminated: list) -> None:
    """Put back the SIGTERM handler main() replaced: a SIGTERM while the interpreter exits (torchrun
    stops the other ranks of a failed run that way) must not raise inside atexit callbacks."""
    import signal

    previous = getattr(terminated, "previous", None)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt() -> list[bool]:
    """Treat SIGTERM (what schedulers and ``timeout`` send) like Ctrl-C, so a prune says how many
    layers are checkpointed and that ``--resume`` continues, instead of dying silently. Returns a
    list that becomes truthy once SIGTERM arrived."""
    import signal
    import threading

    class Seen(list):
        previous: object = None

    seen = Seen()
    if threading.current_thread() is not threading.main_thread():
        return seen

    def handler(_signum: int, _frame: object) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    seen.previous = signal.signal(signal.SIGTERM, handler)
    return seen
