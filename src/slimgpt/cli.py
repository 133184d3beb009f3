"""Command line: ``slimgpt prune | eval | ...``. Parses, calls :mod:`slimgpt.api`, prints.

Any :class:`~slimgpt.errors.SlimGPTError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from slimgpt.config import CPU_NSAMPLES, CPU_SEQLEN, DEFAULT_MODEL, GPU_NSAMPLES, GPU_SEQLEN, PruneConfig
from slimgpt.errors import SlimGPTError
from slimgpt.schedule import SCHEDULES

log = logging.getLogger("slimgpt")

# Subcommands added by other modules: name -> (configure parser, run). Keeps this file short.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (configure, fn)
        return fn

    return deco


def ratio_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"zoo name, local Hugging Face folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new model is complete")
    p.add_argument("--method", default="slimgpt",
                   help="slimgpt (default) | blockpruner | shortgpt | slimgpt+blockpruner | magnitude | wanda-sp | "
                   "flap | llm-pruner")
    p.add_argument("--ratio", type=ratio_arg, default=0.2, help="share of ALL parameters to remove, in (0, 1)")
    p.add_argument("--schedule", default="log",
                   help=f"per-layer ratio schedule: {'|'.join(SCHEDULES)} or a file of per-layer ratios")
    p.add_argument("--first-ratio", type=ratio_arg, help="layer 0's ratio (default: mean layer ratio / 3.2)")
    p.add_argument("--calib", default="c4", help="c4 | wikitext2 | wiki | FILE(.txt/.jsonl/.json) | hub dataset")
    p.add_argument("--nsamples", type=int,
                   help=f"calibration windows (default {GPU_NSAMPLES} on GPU, {CPU_NSAMPLES} on CPU)")
    p.add_argument("--seqlen", type=int, help=f"tokens per window (default {GPU_SEQLEN} on GPU, {CPU_SEQLEN} on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping λ (× mean diagonal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA) | float32 | float16 | bfloat16")
    p.add_argument("--head-score", default="gcd", help="gcd (paper) | gcd-exact | initial (the '-GCD' ablation)")
    p.add_argument("--ffn-groups", default="dynamic", help="dynamic (DGS) | N fixed group size ('-DGS': 128)")
    p.add_argument("--min-group", type=int, default=8, help="smallest dynamic group size")
    p.add_argument("--max-group", type=int, default=1024, help="largest dynamic group size")
    p.add_argument("--propagate", default="pruned", help="pruned (paper) | original outputs to the next layer")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ and calibration/ (default $SLIMGPT_DATA)")
    p.add_argument("--ppl", action="store_true",
                   help="also evaluate perplexity (seq 128) before and after, on --ppl-data")
    p.add_argument("--ppl-data", default="auto",
                   help="with --ppl: wikitext2 | wiki | c4 | FILE | auto (default: WikiText-2 when a data folder or "
                        "the hub has it, else Wikipedia articles from an installed wheel, named as such)")
    p.add_argument("--ppl-windows", type=int,
                   help="with --ppl: evaluate the first N windows (default: all on GPU, 128 on CPU)")
    p.add_argument("--blocks", type=int, help="blockpruner/shortgpt: remove N attention/MLP blocks instead of --ratio")
    p.add_argument("--depth-share", type=float, default=0.5, help="slimgpt+blockpruner: share of removed params taken by blocks")
    add_search_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run checkpointed in OUT.partial/ (blockpruner: OUT.search.json); same options required")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="e.g. 4GiB: if the model would not fit, stream it one layer at a time from disk "
                        "(default: stream only when it exceeds the memory available)")
    p.add_argument("--offload-activations", metavar="DIR",
                   help="keep calibration activations between layers in memory-mapped files in DIR")
    from slimgpt.commands_eval import add_prune_eval_args  # --eval TASKS, --report

    add_prune_eval_args(p)


def add_search_args(p: argparse.ArgumentParser) -> None:
    """BlockPruner's search knobs (prune and compare)."""
    p.add_argument("--search-dtype", default="auto",
                   help="blockpruner search precision: auto (bf16 on CPUs with native bf16, else the model's) | float32 "
                        "| bfloat16 | float16")
    p.add_argument("--search-nsamples", type=int,
                   help="blockpruner: score candidates on the first N calibration windows (default: all)")


def config_from_args(a: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        model=a.model, out=a.out, method=a.method, ratio=a.ratio, schedule=a.schedule, first_ratio=a.first_ratio,
        calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size, damp=a.damp, seed=a.seed,
        device=a.device, dtype=a.dtype, head_score=a.head_score, ffn_groups=a.ffn_groups, min_group=a.min_group,
        max_group=a.max_group, propagate=a.propagate, data_dir=a.data_dir, overwrite=a.overwrite,
        blocks=a.blocks, depth_share=a.depth_share, search_dtype=a.search_dtype, search_nsamples=a.search_nsamples,
        resume=a.resume, max_memory=a.max_memory, offload_activations=a.offload_activations,
    )


@command("prune", add_prune_args)
def cmd_prune(a: argparse.Namespace) -> int:
    """Prune a model (SlimGPT by default, or --method ...) to a share of its parameters and save it."""
    from slimgpt.api import format_layer_table, prune

    cfg = config_from_args(a)
    cfg.validate()
    from slimgpt.commands_eval import after_prune, check_prune_eval_args

    check_prune_eval_args(a)
    dense_ppl = pruned_ppl = None
    if a.ppl:
        from slimgpt.evaluation.perplexity import dataset_label, perplexity, resolve_eval_dataset
        from slimgpt.utils import resolve_device
        from slimgpt.zoo import load_model

        ppl_data = resolve_eval_dataset(a.ppl_data, cfg.data_dir, cfg.calib)
        windows = a.ppl_windows or (None if resolve_device(cfg.device).type == "cuda" else 128)
        m, t = load_model(cfg.model)
        dense_ppl = perplexity(m, t, ppl_data, seqlen=128, max_windows=windows, data_dir=cfg.data_dir)
        del m
    res = prune(cfg)
    print(format_layer_table(res.report))
    if a.ppl:
        if res.model is None:  # streamed: the pruned model was never whole in memory
            from slimgpt.io import load_pruned

            res.model, _ = load_pruned(res.out)
        pruned_ppl = perplexity(res.model, res.tokenizer, ppl_data, seqlen=128, max_windows=windows,
                                data_dir=cfg.data_dir)
        print(f"{dataset_label(ppl_data)} perplexity (seq 128, {pruned_ppl['windows']} windows): "
              f"dense {dense_ppl['ppl']:.2f} → pruned {pruned_ppl['ppl']:.2f}")
    after_prune(a, res, dense_ppl, pruned_ppl)
    print(f"saved to {res.out} (reload: AutoModelForCausalLM.from_pretrained('{res.out}') and AutoTokenizer likewise, "
          "after `import slimgpt` or with trust_remote_code=True)")
    return 0


# `slimgpt eval` (and bench, report) live in slimgpt.commands_eval.


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
    _load_plugins()
    for name, (configure, fn) in COMMANDS.items():
        sp = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None,
                            formatter_class=_HelpFormatter)
        configure(sp)
        sp.set_defaults(func=fn)
    return p


def _load_plugins() -> None:
    """Import modules that add subcommands (bench, report, finetune, export, ...), if present."""
    import importlib

    for mod in ("slimgpt.cli_extra", "slimgpt.commands_compare", "slimgpt.commands_finetune_export",
                "slimgpt.commands_eval"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    terminated = _sigterm_as_interrupt()
    try:
        return args.func(args)
    except SlimGPTError as e:
        print(f"slimgpt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"slimgpt: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


def _sigterm_as_interrupt() -> list[bool]:
    """Treat SIGTERM (what schedulers and ``timeout`` send) like Ctrl-C, so a prune says how many
    layers are checkpointed and that ``--resume`` continues, instead of dying silently. Returns a
    list that becomes truthy once SIGTERM arrived."""
    import signal
    import threading

    seen: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        return seen

    def handler(_signum: int, _frame: object) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return seen


if __name__ == "__main__":
    sys.exit(main())
