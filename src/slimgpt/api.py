"""The public Python API: :func:`prune`. The CLI only parses and calls the library.

A run is a short list of named steps (:mod:`slimgpt.pipeline`); read them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimgpt import pipeline
from slimgpt.config import PruneConfig
from slimgpt.pipeline import format_layer_table

__all__ = ["PruneResult", "format_layer_table", "prune"]


@dataclass
class PruneResult:
    model: Any
    tokenizer: Any
    report: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def prune(cfg: PruneConfig, model: Any = None, tokenizer: Any = None, progress: bool = True) -> PruneResult:
    """Prune ``cfg.model`` (or the given in-memory model) and, if ``cfg.out`` is set, save it.

    The output folder is checked before any work and written atomically at the end. With
    ``cfg.out``, a layer-wise run checkpoints every finished layer in ``OUT.partial/``
    (:mod:`slimgpt.checkpoint`; ``cfg.resume`` continues from it). When the model would not fit in
    ``cfg.max_memory`` (or the memory available), layers are streamed from disk one at a time
    (:mod:`slimgpt.streaming`); then ``PruneResult.model`` is ``None`` (load ``out`` to use it).
    """
    run = pipeline.start(cfg, in_memory=model is not None, progress=progress)
    execution = pipeline.make_execution(run)  # opens the checkpoint: a refused --resume loads nothing
    pipeline.load(run, model, tokenizer)
    pipeline.calibrate(run)
    assert run.mem is not None
    with run.mem.track():
        outcome = execution.execute(run)  # plan widths, run the method, cut the tensors
    if outcome.model is not None:
        outcome.model.eval()
    report = pipeline.build_report(run, outcome)
    out = execution.save(run, outcome.model, report) if run.cfg.out is not None else None
    return PruneResult(outcome.model, run.tokenizer, report, out)
