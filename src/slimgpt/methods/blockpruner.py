"""BlockPruner (Zhong et al. 2024; ALGORITHMS.md §7): remove whole attention / MLP residual blocks
by an iterative perplexity search.

The decoder is a chain of ``2L`` residual blocks (layer ``i``'s attention is block ``2i``, its MLP
block ``2i+1``). Removing a block makes its residual branch add nothing (``h = h``). Each round
scores every remaining block by the calibration perplexity of the model with that block removed
on top of those already removed, and removes the best one.

**Why a forward sweep and not a boundary cache.** A candidate's perplexity only depends on the
hidden state entering it (under the current removals): everything before it is shared. Caching
every boundary (``2L × nsamples × seqlen × hidden``) costs 4.5 GB for SmolLM2 at 64 × 512 in fp32.
Instead each round walks the blocks in order, per calibration batch, keeping only the *running*
boundary state ``h``: at block ``b`` it scores candidate ``b`` by running the blocks after ``b``
on ``h`` (skipping ``b``), then advances ``h`` through ``b``. A round with ``R`` remaining blocks
therefore costs ``R(R-1)/2`` block passes for the candidates plus ``R`` to advance, i.e. exactly
what a full boundary cache would need after each removal (the cache must be refreshed past the
removed block anyway), versus ``R(R-1)`` from the embedding; the memory is one batch of
activations. ``R + 1`` LM-head passes per round are the same either way (the last one gives the
current model's perplexity for free). No exact scheme can do fewer block passes: every candidate's
suffix runs on a different input.

**Search precision and size.** The search only *ranks* candidates, so it may run on a cheaper
copy than the model that is pruned: ``--search-dtype auto`` uses bfloat16 on a CPU with native
bf16 matrix units (AMX / AVX512-BF16; 2-3× faster here, and the paper searched in fp16 on GPUs)
and the model's own dtype elsewhere; ``--search-nsamples N`` scores on the first N calibration
windows only. Both are recorded with the result; ``--search-dtype float32`` is the exact search.

**Resume.** With ``--out``, each finished round is journalled in ``OUT.search.json`` (removal order,
records, counters, and a fingerprint of the settings and calibration windows); ``--resume`` replays
it and searches on from the next round, with the same result as an uninterrupted run.

**Many processes.** Under ``torchrun`` each rank sweeps its own share of the calibration batches
and the per-batch NLLs of every candidate are gathered and summed in batch order, so every rank
picks the same block and the search equals the single-process one bitwise, in ``1/N`` of the
time; only rank 0 writes the journal.

**Serving targets.** Under ``--target vllm|sglang`` the search removes only blocks the engine's
route serves (:func:`removable`): any block on the deci route (vLLM's DeciLM, SGLang) as long as
one attention stays and the first block kept is one; MLP blocks only where the model has no deci
mapping (vLLM's Transformers backend keeps every attention). A block it may not remove is still
run, never scored.

Parameter accounting uses each block's removable parameters (attention: q/k/v/o; MLP:
gate/up/down) as surgery removes them; norms and biases left in place are not counted as removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimgpt import distributed
from slimgpt.arch.base import ModelAdapter
from slimgpt.errors import ConfigError, NumericalError
from slimgpt.methods.base import GlobalMethod, PruneContext
from slimgpt.plan import LayerPlan
from slimgpt.runner import Timer
from slimgpt.schedule import LayerSpace, model_kind, target_constraint
from slimgpt.serving import Constraint
from slimgpt.twin import resolve_search_dtype, search_adapter

log = logging.getLogger(__name__)

KINDS = ("attn", "mlp")
_LOGITS_BYTES = 256 << 20  # fp32 logits per LM-head chunk


def block_name(b: int) -> str:
    """``"12.attn"`` / ``"12.mlp"`` for block ``b`` (layer ``b // 2``)."""
    return f"{b // 2}.{KINDS[b % 2]}"


def block_params(spaces: list[LayerSpace], b: int) -> int:
    """Parameters surgery removes with block ``b``."""
    s = spaces[b // 2]
    if b % 2 == 0:
        return s.num_heads * s.per_q_head + s.num_kv_heads * s.per_kv_head
    return s.channels * s.per_channel


class BlockChain:
    """The decoder as a chain of residual blocks over fixed-length calibration windows."""

    def __init__(self, adapter: ModelAdapter, seqlen: int, device: torch.device) -> None:
        self.adapter, self.device = adapter, device
        self.dtype = next(adapter.model.parameters()).dtype
        self.ctx = adapter.context(seqlen, device, self.dtype)
        self.num_blocks = 2 * adapter.num_layers
        self.block_passes = 0  # blocks run on one batch
        self.head_passes = 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(ids.to(self.device))

    def apply(self, b: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.adapter.layers[b // 2]
        self.block_passes += 1
        if b % 2 == 0:
            return self.adapter.attention_block(layer, h, self.ctx)
        return self.adapter.mlp_block(layer, h)

    def nll(self, h: torch.Tensor, ids: torch.Tensor) -> float:
        """Summed next-token NLL (float64) of final hidden states ``h`` for windows ``ids``; the
        LM head runs in token chunks so a large vocabulary never materialises all logits."""
        self.head_passes += 1
        x = h[:, :-1].reshape(-1, h.shape[-1])
        t = ids[:, 1:].reshape(-1).to(self.device)
        vocab = self.adapter.model.get_output_embeddings().out_features
        chunk = max(1, _LOGITS_BYTES // (4 * vocab))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for s in range(0, x.shape[0], chunk):
            logits = self.adapter.logits(x[s : s + chunk]).float()
            total += F.cross_entropy(logits, t[s : s + chunk], reduction="sum").double()
        value = float(total)
        if not math.isfinite(value):
            raise NumericalError("NaN/inf logits during the block search; use --dtype float32 or check the model")
        return value

    def tail_nll(self, h: torch.Tensor, blocks: list[int], ids: torch.Tensor) -> float:
        for b in blocks:
            h = self.apply(b, h)
        return self.nll(h, ids)


def removable(b: int, present: list[int], constraint: Constraint | None) -> bool:
    """Whether block ``b`` may be removed from the model made of ``present`` under ``constraint``
    (``--target``): an attention block never on a route that keeps every attention, nor the last
    one on a route with one head count for the model (it needs a layer that has heads), nor the
    first block where the first kept block must be an attention and an MLP would come first."""
    if constraint is None or b % 2:
        return True
    if constraint.keep_attention:
        return False
    if constraint.uniform_heads and sum(1 for x in present if x % 2 == 0) == 1:
        return False
    return not (constraint.leading_attention and b == present[0] and len(present) > 1 and present[1] % 2)


@torch.no_grad()
def sweep_rows(chain: BlockChain, batches: list[torch.Tensor], present: list[int],
               fixed: frozenset[int] = frozenset()) -> list[list[float]]:
    """One search round, per batch: the NLL with each block of ``present`` removed (``inf``, not
    computed, for the ``fixed`` blocks, which may not go), then the NLL of the current model (all
    of ``present`` kept), by the forward sweep of the module docstring."""
    rows = []
    for ids in batches:
        row = []
        h = chain.embed(ids)
        for j, b in enumerate(present):
            row.append(math.inf if b in fixed else chain.tail_nll(h, present[j + 1 :], ids))
            h = chain.apply(b, h)
        row.append(chain.nll(h, ids))
        rows.append(row)
    return rows


def sum_rows(rows: list[list[float]], width: int) -> list[float]:
    """Column sums in row (batch) order, from 0.0: the same rounding wherever the rows were made."""
    total = [0.0] * width
    for row in rows:
        for j, v in enumerate(row):
            total[j] += v
    return total


@torch.no_grad()
def sweep(chain: BlockChain, batches: list[torch.Tensor], present: list[int]) -> tuple[list[float], float]:
    """One search round: summed NLL with each block of ``present`` removed, and the NLL of the
    current model (all of ``present`` kept)."""
    total = sum_rows(sweep_rows(chain, batches, present), len(present) + 1)
    return total[:-1], total[-1]


@torch.no_grad()
def chain_nll(chain: BlockChain, batches: list[torch.Tensor], present: list[int]) -> float:
    """Summed NLL of the model made of ``present`` blocks, from the embedding (the reference)."""
    return sum(chain.tail_nll(chain.embed(ids), present, ids) for ids in batches)


@dataclass
class SearchResult:
    """What the search did: removal order with the calibration perplexity after each step, and
    its cost (candidate evaluations, block passes over the whole calibration set, seconds)."""

    removed: list[int]
    steps: list[dict[str, Any]]
    dense_ppl: float
    evaluations: int = 0
    block_passes: float = 0.0
    block_passes_from_embedding: float = 0.0
    search_s: float = 0.0
    calibration_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed"] = [block_name(b) for b in self.removed]
        return d


class SearchJournal:
    """The search's progress on disk, one atomic rewrite per finished round (see the module
    docstring); ``key`` fingerprints everything that decides the result."""

    def __init__(self, path: str | Path, key: dict[str, Any], resume: bool) -> None:
        self.path, self.key = Path(path), json.loads(json.dumps(key, default=str))
        if self.path.exists() and not resume:
            raise ConfigError(f"{self.path} holds an unfinished block search for this --out; add --resume to "
                              "continue it, or delete it to start over")

    @staticmethod
    def for_out(out: str | Path) -> Path:
        out = Path(out).expanduser().resolve()
        return out.with_name(out.name + ".search.json")

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path} is not a readable search journal ({e}); delete it and run again") from None
        if state.get("key") != self.key:
            raise ConfigError(f"cannot --resume {self.path}: it was started with other settings or calibration "
                              "data; rerun with the same options, or delete it to start over")
        return state

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, **state}, default=str))
        os.replace(tmp, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def block_search(
    adapter: ModelAdapter,
    calib: torch.Tensor,
    spaces: list[LayerSpace],
    device: torch.device,
    *,
    n_blocks: int | None = None,
    target_params: float | None = None,
    dense_params: int | None = None,
    batch_size: int = 8,
    timer: Timer | None = None,
    progress: bool = True,
    allow_none: bool = False,
    journal: SearchJournal | None = None,
    constraint: Constraint | None = None,
) -> SearchResult:
    """Iteratively remove the block whose removal gives the lowest calibration perplexity.

    Stops after ``n_blocks`` removals, or, with ``target_params``, at the number of removals whose
    removed parameters are nearest to it (the search runs until the target is reached or passed
    and drops the last step if the step before was nearer; down to no removal only with
    ``allow_none``). Ties in perplexity go to the earlier block, so the result is deterministic.
    A ``journal`` records every round and, when it holds rounds already, the search continues from them.
    Under ``torchrun`` every rank sweeps its share of the batches (see the module docstring).
    ``constraint`` (``--target``): only blocks :func:`removable` allows are candidates.
    """
    total = 2 * adapter.num_layers
    sizes = [block_params(spaces, b) for b in range(total)]
    if (n_blocks is None) == (target_params is None):
        raise ValueError("give exactly one of n_blocks and target_params")
    if n_blocks is not None and not 0 < n_blocks < total:
        raise ConfigError(f"--blocks must be in 1..{total - 1} for a model with {total} blocks; got {n_blocks}")
    if target_params is not None and target_params >= sum(sizes):
        raise ConfigError(
            f"the target removes {target_params / 1e6:.2f}M parameters but all attention and MLP blocks hold "
            f"{sum(sizes) / 1e6:.2f}M; lower --ratio"
        )
    if constraint is not None and constraint.keep_attention:  # MLP blocks only
        mlps = sum(sizes[1::2])
        if (n_blocks or 0) > total // 2 or (target_params or 0) >= mlps:
            raise ConfigError(f"--target keeps every attention here, and the MLP blocks hold {mlps / 1e6:.2f}M "
                              f"parameters ({total // 2} blocks); lower --ratio or --blocks")
    timer = timer or Timer(device)
    dense_params = dense_params or sum(sizes)
    chain = BlockChain(adapter, calib.shape[1], device)
    batches = list(calib.split(batch_size))
    tokens = calib.shape[0] * (calib.shape[1] - 1)
    n_batches = len(batches)
    mine = batches[distributed.batch_range(n_batches).start : distributed.batch_range(n_batches).stop]

    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    dense_ppl = math.nan
    evaluations, scratch, earlier_s = 0, 0, 0.0
    state = distributed.agree(journal.load, "reading the search journal") if journal is not None else None
    if state is not None:
        removed, steps, dense_ppl = state["removed"], state["steps"], state["dense_ppl"]
        evaluations, scratch, earlier_s = state["evaluations"], state["scratch"], state["search_s"]
        chain.block_passes, chain.head_passes = state["block_passes"], state["head_passes"]
        log.info("resuming the block search from %s: %d rounds done", journal.path, len(removed))
    removed_params = sum(sizes[b] for b in removed)
    t0 = time.perf_counter()
    bar = tqdm(desc="blockpruner: blocks removed", total=n_blocks, initial=len(removed), disable=not progress)
    while True:
        if n_blocks is not None and len(removed) >= n_blocks:
            break
        if target_params is not None and removed_params >= target_params:
            break
        present = [b for b in range(total) if b not in removed]
        fixed = frozenset(b for b in present if not removable(b, present, constraint))
        if len(fixed) == len(present):
            break
        with timer("forward"):
            passes = (chain.block_passes, chain.head_passes)
            rows = sweep_rows(chain, mine, present, fixed)
        if distributed.is_distributed():
            with timer("communication"):
                done = (chain.block_passes - passes[0], chain.head_passes - passes[1])
                every = distributed.gather_rows([(rows, done)], f"block search round {len(removed) + 1}")
            rows = [row for part, _ in every for row in part]  # rank order = batch order
            chain.block_passes = passes[0] + sum(d[0] for _, d in every)
            chain.head_passes = passes[1] + sum(d[1] for _, d in every)
        sums = sum_rows(rows, len(present) + 1)
        cand, current = sums[:-1], sums[-1]
        evaluations += len(present) - len(fixed)
        scratch += len(present) * (len(present) - 1)
        if not removed:
            dense_ppl = math.exp(current / tokens)
        order = sorted((j for j in range(len(present)) if present[j] not in fixed), key=lambda j: (cand[j], present[j]))
        best = present[order[0]]
        removed.append(best)
        removed_params += sizes[best]
        ppl = math.exp(cand[order[0]] / tokens)
        runner_up = present[order[1]] if len(order) > 1 else None
        steps.append({
            "step": len(removed), "block": block_name(best), "layer": best // 2, "kind": KINDS[best % 2],
            "ppl": ppl, "params": sizes[best], "params_removed": removed_params,
            "removed_ratio": removed_params / dense_params,
            "runner_up": None if runner_up is None else block_name(runner_up),
            "runner_up_ppl": None if runner_up is None else math.exp(cand[order[1]] / tokens),
            "candidates": {block_name(b): round(math.exp(min(c / tokens, 700)), 4) for b, c in zip(present, cand)
                           if b not in fixed},
        })
        log.info("removed block %s: calibration ppl %.3f, %.2f%% of parameters removed",
                 block_name(best), ppl, 100 * removed_params / dense_params)
        bar.update(1)
        bar.set_postfix(block=block_name(best), ppl=f"{ppl:.2f}")
        if journal is not None and distributed.is_main():
            journal.save({"removed": removed, "steps": steps, "dense_ppl": dense_ppl, "evaluations": evaluations,
                          "scratch": scratch, "search_s": earlier_s + time.perf_counter() - t0,
                          "block_passes": chain.block_passes, "head_passes": chain.head_passes})
    bar.close()

    if target_params is not None and len(removed) > (0 if allow_none else 1):
        before = removed_params - sizes[removed[-1]]
        if abs(before - target_params) < abs(removed_params - target_params):
            dropped = removed.pop()
            steps[-1]["undone"] = True  # kept in the record: it was evaluated, then not applied
            log.info("undid the last removal (%s): %s parameters are nearer the target",
                     block_name(dropped), f"{before:,}")
    res = SearchResult(
        removed=removed, steps=steps, dense_ppl=dense_ppl, evaluations=evaluations,
        block_passes=chain.block_passes / n_batches, block_passes_from_embedding=float(scratch),
        search_s=earlier_s + time.perf_counter() - t0, calibration_tokens=tokens,
    )
    res.extra["head_passes"] = chain.head_passes / n_batches
    log.info("block search: %d candidate evaluations in %d rounds, %.0f block passes (%.0f from the embedding), "
             "%.1f s", evaluations, len(steps), res.block_passes, scratch, res.search_s)
    return res


def run_search(ctx: PruneContext, **kw: Any) -> SearchResult:
    """:func:`block_search` over ``ctx``'s model with the configured search dtype and subset."""
    cfg = ctx.cfg
    calib = ctx.calib[: cfg.search_nsamples] if cfg.search_nsamples else ctx.calib
    dtype = resolve_search_dtype(cfg.search_dtype, next(ctx.model.parameters()).dtype, ctx.device)
    with search_adapter(ctx.adapter, ctx.device, dtype) as adapter:
        res = block_search(adapter, calib, ctx.spaces, ctx.device, dense_params=ctx.dense_params,
                           batch_size=cfg.batch_size, timer=ctx.timer, progress=ctx.progress,
                           journal=ctx.journal, **kw)
    res.extra.update(search_dtype=str(dtype).removeprefix("torch."), search_windows=int(calib.shape[0]))
    return res


def removal_plans(adapter: ModelAdapter, blocks: list[int]) -> dict[int, LayerPlan]:
    """Plans that delete ``blocks`` (``kept_heads=[]`` / ``kept_channels=[]``). The blocks' output
    weights and biases are zeroed in place first, so the unshrunk model already equals the
    skip-model and an output bias (which surgery keeps) cannot leak into the residual stream."""
    plans: dict[int, LayerPlan] = {}
    with torch.no_grad():
        for b in sorted(blocks):
            layer = adapter.layers[b // 2]
            plan = plans.setdefault(b // 2, LayerPlan())
            out = adapter.attention(layer).o if b % 2 == 0 else adapter.mlp(layer).down
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
            if b % 2 == 0:
                plan.kept_heads = []
            else:
                plan.kept_channels = []
    return plans


def target_from_config(ctx: PruneContext, unit: int = 1) -> tuple[int | None, float | None]:
    """``(n_blocks, target_params)`` from ``--blocks`` (counted in blocks, a multiple of ``unit``)
    or ``--ratio`` (a share of all parameters)."""
    blocks = getattr(ctx.cfg, "blocks", None)
    if blocks is not None:
        if blocks % unit:
            raise ConfigError(f"--blocks {blocks}: this method removes whole layers (2 blocks each); give an even number")
        return blocks, None
    return None, ctx.cfg.ratio * ctx.dense_params


class DepthMethod(GlobalMethod):
    """A method that removes whole blocks: no settings of its own, and its search record
    (a :class:`SearchResult` or a plain dict) saved under ``"search"`` in the run's JSON."""

    depth_unit = "block"  # for `slimgpt compare`: achieved ratios come in whole blocks (or layers)

    def __init__(self) -> None:
        self.result: SearchResult | dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> DepthMethod:
        return cls()

    def config(self) -> dict:
        d: dict[str, Any] = {"name": self.name}
        if self.result is not None:
            d["search"] = self.result.as_dict() if isinstance(self.result, SearchResult) else self.result
        return d


class BlockPruner(DepthMethod):
    """Iterative perplexity search over attention and MLP blocks (§7)."""

    name = "blockpruner"
    distributed = True  # the search splits its batches across torchrun processes
    resumable = True  # the search journals its rounds (SearchJournal)

    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        n_blocks, target = target_from_config(ctx)
        self.result = run_search(ctx, n_blocks=n_blocks, target_params=target, constraint=block_constraint(ctx))
        return removal_plans(ctx.adapter, self.result.removed)


def block_constraint(ctx: PruneContext) -> Constraint | None:
    """The route a whole-block search prunes for under ``--target``: deci (any block, one head
    count) where the model has a deci mapping, else vLLM's Transformers backend (MLP blocks only)."""
    return target_constraint(getattr(ctx.cfg, "target", "any"), *model_kind(ctx.model.config), prefer="deci")
