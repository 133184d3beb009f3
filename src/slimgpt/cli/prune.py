"""``slimgpt prune``: prune a model and save it; optionally perplexity, zero-shot tasks and a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgpt.cli.common import add_search_args, add_task_args, check_task_args, parse_limit, ratio_arg
from slimgpt.defaults import CPU_NSAMPLES, CPU_SEQLEN, DEFAULT_MODEL, GPU_NSAMPLES, GPU_SEQLEN
from slimgpt.errors import ConfigError
from slimgpt.schedule import SCHEDULES
from slimgpt.serving import TARGETS

if TYPE_CHECKING:  # argument parsing imports nothing heavy: a typo is answered in about a second
    from slimgpt.config import PruneConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"zoo name, local Hugging Face folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new model is complete")
    p.add_argument("--method", default="slimgpt",
                   help="slimgpt (default) | blockpruner | shortgpt | slimgpt+blockpruner | magnitude | wanda-sp | "
                   "flap | llm-pruner")
    p.add_argument("--ratio", type=ratio_arg,
                   help="share of ALL parameters to remove, in (0, 1) (default 0.2; not with --blocks or a schedule file, "
                        "which set the budget themselves)")
    p.add_argument("--schedule", default="auto",
                   help=f"per-layer allocation: {'|'.join(SCHEDULES)} or a file of per-layer ratios; auto (default) "
                   "scores log/uniform curves x attention shares by calibration KL, log is the paper's")
    p.add_argument("--first-ratio", type=ratio_arg, help="layer 0's ratio (default: mean layer ratio / 3.2)")
    p.add_argument("--target", default="any", choices=TARGETS,
                   help="serving engine whose shapes every allocation is chosen inside (the budget stays exact): "
                        "any (default, no limit) | vllm (vLLM's Transformers backend: per-layer heads and FFN widths, "
                        "every layer keeps some attention; blockpruner/shortgpt/slimgpt+blockpruner use its DeciLM "
                        "route: whole blocks removed, one head count) | sglang (SGLang/TensorRT-LLM: heads unpruned or "
                        "the attention removed whole, FFN widths in multiples of 256); not with --method flap")
    p.add_argument("--calib", default="c4", help="c4 | wikitext2 | wiki | FILE(.txt/.jsonl/.json) | hub dataset")
    p.add_argument("--nsamples", type=int,
                   help=f"calibration windows (default {GPU_NSAMPLES} on GPU, {CPU_NSAMPLES} on CPU)")
    p.add_argument("--seqlen", type=int, help=f"tokens per window (default {GPU_SEQLEN} on GPU, {CPU_SEQLEN} on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping λ (× mean diagonal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU; bf16 on CUDA, fp16 on GPUs without bf16) | float32 | float16 | bfloat16")
    p.add_argument("--save-dtype", default="auto",
                   help="weights on disk: auto (the source checkpoint's bf16/fp16 when the run computed in fp32, "
                        "so a CPU run does not double the model's size; else the run's) | float32 | float16 | bfloat16")
    p.add_argument("--head-score", default="gcd", help="gcd (paper) | gcd-exact | initial (the '-GCD' ablation)")
    p.add_argument("--ffn-groups", default="dynamic", help="dynamic (DGS) | N fixed group size ('-DGS': 128)")
    p.add_argument("--min-group", type=int, default=8, help="smallest dynamic group size")
    p.add_argument("--max-group", type=int, default=1024, help="largest dynamic group size")
    p.add_argument("--propagate", default="pruned", help="pruned (paper) | original outputs to the next layer")
    p.add_argument("--compensate", default="symmetric", choices=("symmetric", "asymmetric", "drift"),
                   help="slimgpt: what the kept weights are solved toward. symmetric (default, the paper): the layer's "
                        "own output on the inputs it sees; asymmetric: the dense model's output of the same linear "
                        "(also corrects the error earlier pruned layers left; a second, dense activation stream: one "
                        "more copy of the activations, one more pass per layer); drift: the dense block's output, "
                        "residual stream included")
    p.add_argument("--shrink", default="heldout",
                   help="with --compensate asymmetric|drift: the share of the correction toward the dense model "
                        "applied per linear. heldout (default): chosen on every 4th calibration window, held out of "
                        "its fit (the full refit overfits the calibration tokens); a number in [0, 1]: that share "
                        "(1 = the exact least-squares refit)")
    p.add_argument("--data-dir", help="folder with wikitext-2-raw/ and calibration/ (default $SLIMGPT_DATA)")
    p.add_argument("--ppl", action="store_true",
                   help="also evaluate perplexity (seq 128) before and after, on --ppl-data")
    p.add_argument("--ppl-data", default="auto",
                   help="with --ppl: wikitext2 | wiki | c4 | FILE | auto (default: WikiText-2 when a data folder or "
                        "the hub has it, else Wikipedia articles from an installed wheel, named as such)")
    p.add_argument("--ppl-windows", type=int,
                   help="with --ppl: evaluate the first N windows (default: all on GPU, 128 on CPU)")
    p.add_argument("--blocks", type=int, help="blockpruner/shortgpt: remove N attention/MLP blocks instead of --ratio")
    p.add_argument("--depth-share", type=float,
                   help="slimgpt+blockpruner: share of removed params taken by blocks (default 0.5)")
    add_search_args(p)
    from slimgpt.search.options import add_allocation_args  # --search-* of --schedule search

    add_allocation_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run checkpointed in OUT.partial/ (blockpruner: OUT.search.json); same options required")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="e.g. 4GiB: if the model would not fit, stream it one layer at a time from disk "
                        "(default: stream only when it exceeds the memory available)")
    p.add_argument("--offload-activations", metavar="DIR",
                   help="keep calibration activations between layers in memory-mapped files in DIR")
    add_prune_eval_args(p)


def add_prune_eval_args(p: argparse.ArgumentParser) -> None:
    """The ``prune`` options handled by :func:`after_prune`."""
    add_task_args(p, "--eval")
    p.add_argument("--eval-baseline", action="store_true",
                   help="with --eval: also score the dense source model (doubles the evaluation time)")
    p.add_argument("--report", action="store_true",
                   help="write OUT/report.md with plots (per-layer ratios and output errors, PPL/accuracy bars)")


def check_prune_eval_args(a: argparse.Namespace) -> None:
    """Validate ``--eval`` options before pruning starts (so a typo does not cost a pruning run)."""
    if getattr(a, "eval_baseline", False) and not getattr(a, "tasks", None):
        raise ConfigError("--eval-baseline needs --eval TASKS")
    parse_limit(getattr(a, "limit", None))
    check_task_args(getattr(a, "tasks", None), getattr(a, "num_fewshot", 0), getattr(a, "tasks_data", None))


def config_from_args(a: argparse.Namespace) -> PruneConfig:
    from slimgpt.config import PruneConfig
    from slimgpt.search.options import allocation_kwargs

    return PruneConfig(
        model=a.model, out=a.out, method=a.method, ratio=0.2 if a.ratio is None else a.ratio, schedule=a.schedule,
        first_ratio=a.first_ratio,
        calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size, damp=a.damp, seed=a.seed,
        device=a.device, dtype=a.dtype, save_dtype=a.save_dtype, head_score=a.head_score, ffn_groups=a.ffn_groups, min_group=a.min_group,
        max_group=a.max_group, propagate=a.propagate, data_dir=a.data_dir, overwrite=a.overwrite,
        blocks=a.blocks, depth_share=0.5 if a.depth_share is None else a.depth_share, search_dtype=a.search_dtype, search_nsamples=a.search_nsamples,
        resume=a.resume, max_memory=a.max_memory, offload_activations=a.offload_activations,
        target=getattr(a, "target", "any"), compensate=getattr(a, "compensate", "symmetric"),
        shrink=getattr(a, "shrink", "heldout"), **allocation_kwargs(a),
    )


def run(a: argparse.Namespace) -> int:
    """Prune a model (SlimGPT by default, or --method ...) to a share of its parameters and save it."""
    check_conflicts(a)
    cfg = config_from_args(a)
    cfg.validate()  # options and the output folder, before anything heavy is imported
    check_prune_eval_args(a)
    preflight(cfg)  # imports torch only: a refusal here takes a few seconds, not a model load
    from slimgpt import distributed
    from slimgpt.api import format_layer_table, prune

    dense_ppl = pruned_ppl = None
    if a.ppl:
        from slimgpt.evaluation.perplexity import dataset_label, perplexity, resolve_eval_dataset
        from slimgpt.utils import resolve_device
        from slimgpt.zoo import load_model

        ppl_data = resolve_eval_dataset(a.ppl_data, cfg.data_dir, cfg.calib)
        device = distributed.init(resolve_device(cfg.device))  # torchrun: the windows are split across ranks
        windows = a.ppl_windows or (None if device.type == "cuda" else 128)
        m, t = load_model(cfg.model)
        dense_ppl = perplexity(m, t, ppl_data, seqlen=128, max_windows=windows, data_dir=cfg.data_dir,
                               desc="perplexity (dense)")
        del m
    res = prune(cfg)
    say = distributed.is_main()  # under torchrun rank 0 prints and writes for all
    if say:
        print(format_layer_table(res.report))
    if a.ppl:
        if res.model is None:  # streamed: the pruned model was never whole in memory
            from slimgpt.io import load_pruned

            res.model, _ = load_pruned(res.out)
        pruned_ppl = perplexity(res.model, res.tokenizer, ppl_data, seqlen=128, max_windows=windows,
                                data_dir=cfg.data_dir, desc="perplexity (pruned)")
        if say:
            print(f"{dataset_label(ppl_data)} perplexity (seq 128, {pruned_ppl['windows']} windows): "
                  f"dense {dense_ppl['ppl']:.2f} → pruned {pruned_ppl['ppl']:.2f}")
            print(process_peak_memory(res.report))
    if not say:
        return 0
    with distributed.solo():  # evaluation files and the report: rank 0 alone
        after_prune(a, res, dense_ppl, pruned_ppl)
    print(f"saved to {res.out} in {res.report.get('saved_dtype', res.report['dtype'])} (reload: AutoModelForCausalLM.from_pretrained('{res.out}') and AutoTokenizer likewise, "
          "after `import slimgpt` or with trust_remote_code=True)")
    return 0


def check_conflicts(a: argparse.Namespace) -> None:
    """Options that would silently override each other are refused (one line, before anything runs)."""
    budget = [o for o, v in (("--ratio", a.ratio), ("--first-ratio", a.first_ratio)) if v is not None]
    if a.blocks is not None and budget:
        raise ConfigError(f"--blocks {a.blocks} and {budget[0]} both set how much is removed; give one (--blocks counts "
                          "attention/MLP blocks, --ratio is a share of all parameters)")
    if a.schedule not in SCHEDULES and budget:
        raise ConfigError(f"--schedule {a.schedule} gives every layer's ratio, so {budget[0]} would be ignored; drop "
                          f"{budget[0]} or use a named schedule")
    if a.depth_share is not None and a.method != "slimgpt+blockpruner":
        raise ConfigError(f"--depth-share splits slimgpt+blockpruner's budget; --method {a.method} ignores it: drop it "
                          "or use --method slimgpt+blockpruner")


def preflight(cfg: PruneConfig) -> None:
    """Before any model is loaded: the model can be opened (a zoo name or GGUF file is converted
    once, here), its calibration windows are no longer than it reads, and they fit the memory."""
    import os

    from slimgpt import distributed
    from slimgpt.methods import make_method
    from slimgpt.methods.base import GlobalMethod
    from slimgpt.preflight import (
        check_architecture,
        check_calibration_memory,
        check_calibration_source,
        check_model,
        check_positions,
        check_prunable_ratio,
        check_schedule_file,
        geometry,
    )
    from slimgpt.utils import resolve_device, resolve_dtype

    check_calibration_source(cfg.calib)  # no model needed: before a zoo model is converted or any is loaded
    path = check_model(cfg.model, check_architecture)
    geo = geometry(path)
    check_schedule_file(cfg.schedule, geo)
    if cfg.blocks is None and cfg.schedule in SCHEDULES:
        check_prunable_ratio(cfg.ratio, geo)
    device = resolve_device(cfg.device)
    c = cfg.resolved(device)
    assert c.nsamples is not None and c.seqlen is not None
    check_positions(cfg.model, geo, c.seqlen)
    check_target(cfg, path)
    whole = isinstance(make_method(c), GlobalMethod)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.launched() else 1
    check_calibration_memory(cfg.model, geo, c.nsamples, c.seqlen, c.batch_size, resolve_dtype(c.dtype, device).itemsize,
                             device, offload_activations=c.offload_activations is not None, whole_model=whole,
                             processes=(local, distributed.world() if distributed.launched() else 1),
                             dense_stream=c.compensate != "symmetric" and c.propagate == "pruned")


def check_target(cfg: PruneConfig, path: str) -> None:
    """``--target``: refuse, from config.json alone, a model the engine cannot serve as this run
    would prune it (the pipeline checks again on the loaded model)."""
    if cfg.target == "any":
        return
    import json

    from slimgpt.serving import config_shapes

    try:
        found = config_shapes(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found is not None:
        shapes, family, sliding = found
        cfg.check_model([f for _, _, f in shapes], family, sliding)


def process_peak_memory(report: dict[str, Any]) -> str:
    """The whole command's peak, perplexity included (the run's own peak stops when pruning ends)."""
    import resource

    from slimgpt.distributed import world

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"peak memory of the whole command (model loads and perplexity included): {peak:,.0f} MiB resident"
            f"{' (this process)' if world() > 1 else ''}; pruning alone: {report['memory']['peak_rss_mib']:,.0f} MiB")


def after_prune(a: argparse.Namespace, res: Any, dense_ppl: dict[str, Any] | None = None,
                pruned_ppl: dict[str, Any] | None = None) -> None:
    """``prune --eval`` / ``--ppl`` / ``--report``: evaluate the pruned model in memory, write
    ``OUT/eval.json`` and the report. The dense model is only loaded when asked for."""
    tasks = getattr(a, "tasks", None)
    if not (tasks or getattr(a, "report", False) or dense_ppl or pruned_ppl):
        return
    from slimgpt.evaluation.results import (
        EVAL_FILE,
        eval_document,
        evaluate_model,
        write_json,
        zeroshot_table,
    )

    out = Path(res.out)
    src = res.report.get("config", {}).get("model", a.model)
    common = {"tasks": tasks, "num_fewshot": a.num_fewshot, "limit": parse_limit(a.limit),
              "batch_size": a.batch_size, "tasks_data": a.tasks_data}
    entries = []
    dense_ppls = {str(dense_ppl["seqlen"]): dense_ppl} if dense_ppl else {}
    if getattr(a, "eval_baseline", False):
        from slimgpt.zoo import load_model

        dense, dtok = load_model(src)
        entries.append(evaluate_model("dense", src, dense, dtok, precomputed_ppl=dense_ppls, **common))
        del dense
    elif dense_ppls:  # perplexity only: no need to load the dense model again
        entries.append({"label": "dense", "model": src, "params": res.report["params"]["dense"], "ppl": dense_ppls})
    if tasks or pruned_ppl is not None:
        model, tok = res.model, res.tokenizer
        if model is None:  # streamed: the pruned model was never whole in memory
            from slimgpt.io import load_pruned

            model, tok = load_pruned(out)
        entries.append(evaluate_model(
            "pruned", str(out), model, tok,
            precomputed_ppl={str(pruned_ppl["seqlen"]): pruned_ppl} if pruned_ppl else None, **common,
        ))
    if entries:
        table = zeroshot_table(entries)
        if table:
            print(table)
        write_json(out / EVAL_FILE, eval_document(entries, {**common, "from": "slimgpt prune"}))
    if getattr(a, "report", False):
        from slimgpt.report import write_report

        path = write_report(out, pruned=(res.model, res.tokenizer) if res.model is not None else None,
                            data_dir=a.data_dir)
        print(f"report: {path}")
