"""SlimGPT with a searched allocation (``--schedule search``; ALGORITHMS.md §9, issue 14).

The log schedule fixes every layer's ratio by a formula and gives heads and channels the same
ratio. Here the calibration KL divergence chooses, per layer, the attention shape, the FFN width
and whether either block goes entirely, under the same parameter budget:

1. :func:`~slimgpt.search.database.build_database`: every (unit, level) variant pruned once with
   SlimGPT's OBS solvers from the dense model's inputs;
2. starts on the budget lattice: the log schedule's widths, a greedy allocation by relative OBS
   error, and FFN channels only (uniform); the one with the lowest KL starts the search;
3. :func:`~slimgpt.search.evolution.evolve`: level-switch mutations, staged selection on growing
   token counts, journalled in ``OUT.search.json`` (``--resume``), stopped by ``--search-budget``;
4. the found widths (fixed up onto the budget to within half a channel) become the model either by
   re-running sequential SlimGPT at those widths (``--search-final rerun``, the default) or by
   stitching the stored variants (``stitch``).

The method is still ``slimgpt`` (its records carry ``schedule: search``), so compare and report treat
it as a SlimGPT schedule; the found allocation is in every layer's plan stats and under ``search``
in ``slimgpt.json``, with the cost split (database, dense logits, evaluations, final pass).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimgpt.errors import ConfigError
from slimgpt.methods.base import GlobalMethod, PruneContext
from slimgpt.methods.slimgpt import SlimGPT
from slimgpt.plan import LayerPlan
from slimgpt.schedule import LayerWidth, model_kind, removed_params, solve_widths, target_constraint
from slimgpt.search.database import LevelDatabase, build_database, dense_mlp_hessian, ffn_variant_at
from slimgpt.search.evolution import EvoSettings, evolve
from slimgpt.search.fitness import KLFitness, Stitcher
from slimgpt.search.levels import Problem, make_problem, nearest_levels, repair, widths_for
from slimgpt.search.options import add_allocation_args, int_list, parse_seconds
from slimgpt.twin import resolve_search_dtype, search_adapter

log = logging.getLogger(__name__)

__all__ = ["SearchedSlimGPT", "add_allocation_args", "error_start"]


def error_start(p: Problem, db: LevelDatabase) -> list[int]:
    """A lattice start from the database alone: raise the unit whose next level costs the least
    relative OBS error (error / the block input's mean squared norm) per parameter, until the
    budget is reached; then repair onto the lattice."""
    rel = []
    for u in range(p.units):
        i, kind = u // 2, ("attn", "ffn")[u % 2]
        norm = max(db.input_norms[i][u % 2], 1e-12)
        rel.append([e / (2 * norm) for e in db.errors[kind][i]])
    levels = [0] * p.units
    while p.total(levels) < p.budget - p.tol:
        cand = [u for u in range(p.units) if levels[u] < p.top(u) and p.valid_up(levels, u)]
        if not cand:  # --target: nothing servable left to raise
            break
        u = min(cand, key=lambda u: ((rel[u][levels[u] + 1] - rel[u][levels[u]]) / p.step(u, levels[u]), u))
        levels[u] += 1
    fixed = repair(p, levels, random.Random(0))
    if fixed is None:
        raise ConfigError("the searched allocation found no start on the budget; lower --ratio")
    return fixed


class _Journal:
    """The run's SearchJournal with this method's state (starts, elapsed time) in every save."""

    def __init__(self, journal: Any, elapsed: Callable[[], float]) -> None:
        self.journal, self.elapsed, self.path = journal, elapsed, journal.path
        self.extra: dict[str, Any] = {}

    def load(self) -> dict[str, Any] | None:
        return self.journal.load()

    def save(self, state: dict[str, Any]) -> None:
        self.journal.save({**state, **self.extra, "elapsed_s": self.elapsed()})


class SearchedSlimGPT(GlobalMethod):
    """SlimGPT's solvers at widths chosen by an evolutionary search on calibration KL."""

    name = "slimgpt"
    resumable = True  # the search journals every generation; the database is reused if finished
    single_process = ("--schedule search runs in one process: each generation's children come from the last "
                      "generation's winner, so there is nothing to split; run plain 'slimgpt prune ... --schedule "
                      "search' without torchrun")

    def __init__(self, width: SlimGPT, cfg: Any) -> None:
        self.width, self.cfg = width, cfg
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> SearchedSlimGPT:
        groups: int | str = cfg.ffn_groups if cfg.ffn_groups == "dynamic" else int(cfg.ffn_groups)
        return cls(SlimGPT(cfg.head_score, groups, cfg.min_group, cfg.max_group, cfg.damp), cfg)

    def config(self) -> dict:
        return {**self.width.config(), "schedule": "search", "search": self.summary}

    def settings(self) -> EvoSettings:
        """Stages in calibration tokens (:meth:`KLFitness.stage` maps them onto windows)."""
        cfg = self.cfg
        stages = int_list(cfg.search_tokens, "search-tokens")
        return EvoSettings(offspring=int(cfg.search_offspring), stages=stages,
                           survivors=int_list(cfg.search_survivors, "search-survivors"),
                           generations=int(cfg.search_generations), seed=int(cfg.seed))

    def plan(self, ctx: PruneContext) -> dict[int, LayerPlan]:
        cfg, spaces = ctx.cfg, ctx.spaces
        t0 = time.perf_counter()
        budget_s = parse_seconds(cfg.search_budget)
        target = cfg.ratio * ctx.dense_params
        if target >= sum(s.params for s in spaces):
            raise ConfigError(f"--ratio {cfg.ratio} removes more than all attention and MLP blocks hold; lower it")
        settings = self.settings()
        need = math.ceil(settings.stages[-1] / ctx.calib.shape[1])
        if need > ctx.calib.shape[0]:
            raise ConfigError(f"--search-tokens needs {need} calibration windows of {ctx.calib.shape[1]} tokens but "
                              f"--nsamples gives {ctx.calib.shape[0]}; lower the tokens or raise --nsamples")
        journal = None
        key: dict[str, Any] = {}
        state = None
        earlier = 0.0
        if ctx.journal is not None:
            for k in ("search_budget", "search_generations"):  # a resume may extend either
                ctx.journal.key.pop(k, None)
            key = {k: v for k, v in ctx.journal.key.items() if k not in ("ratio", "first_ratio", "schedule")
                   and not (k.startswith("search_") and k not in ("search_ffn_step", "search_levels"))}
            state = ctx.journal.load()
            earlier = float(state.get("elapsed_s", 0.0)) if state else 0.0
            journal = _Journal(ctx.journal, lambda: earlier + time.perf_counter() - t0)
        deadline = t0 + budget_s - earlier

        own_tmp = cfg.out is None
        folder = Path(tempfile.mkdtemp(prefix="slimgpt-search-db-")) if own_tmp else \
            Path(cfg.out).expanduser().resolve().with_name(Path(cfg.out).name + ".search.db")
        try:
            plans = self._plan(ctx, settings, target, key, folder, journal, state, deadline, t0, earlier)
        except BaseException:
            if own_tmp:  # beside --out the database stays for --resume
                shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return plans

    def _plan(self, ctx: PruneContext, settings: EvoSettings, target: float, key: dict[str, Any], folder: Path,
              journal: _Journal | None, state: dict[str, Any] | None, deadline: float, t0: float,
              earlier: float) -> dict[int, LayerPlan]:
        cfg, adapter, spaces = ctx.cfg, ctx.adapter, ctx.spaces
        # --target: the ladders hold only servable shapes
        constraint = target_constraint(getattr(cfg, "target", "any"), *model_kind(adapter.model.config))
        ffn_step = int(cfg.search_ffn_step) or None
        levels = None if ffn_step else int(cfg.search_levels)
        times: dict[str, float] = {}
        # the database's forward and every fitness run in the search dtype (bf16 on a CPU with native
        # bf16, as BlockPruner's search): they only rank candidates; the solvers read the model's weights
        model_dtype = next(adapter.model.parameters()).dtype
        search_dtype = resolve_search_dtype(cfg.search_dtype, model_dtype, ctx.device)
        with search_adapter(adapter, ctx.device, search_dtype) as fast:
            t = time.perf_counter()
            db = build_database(adapter, ctx.calib, spaces, ctx.device, folder,
                                {**key, "ffn_step": ffn_step, "levels": levels, "dtype": str(model_dtype),
                                 "forward_dtype": str(search_dtype)},
                                levels=levels, ffn_step=ffn_step, damp=cfg.damp, head_score=self.width.head_score,
                                batch_size=cfg.batch_size, timer=ctx.timer, progress=ctx.progress, forward=fast,
                                constraint=constraint)
            times["database"] = time.perf_counter() - t
            problem = make_problem(spaces, target, attn_removed=db.attn_removed, ffn_kept=db.ffn_levels,
                                   constraint=constraint)
            res, fitness, starts, stats = self._search(ctx, fast, db, problem, settings, target, journal, state,
                                                       deadline, times)
            alloc = widths_for(problem, spaces, res.levels, db.attn_shapes, db.ffn_levels,
                               constraint.ffn_unit if constraint is not None else 1)
            H_fix = None
            if cfg.search_final == "stitch" and alloc.fixup_layer is not None:  # from the pass the database saw
                H_fix = dense_mlp_hessian(fast, ctx.calib, ctx.device, alloc.fixup_layer, cfg.batch_size)
        db_bytes = db.bytes_on_disk()
        t = time.perf_counter()
        if cfg.search_final == "rerun":
            if ctx.run_layers is None:
                raise ConfigError("--search-final rerun needs the pipeline's layer-wise driver")
            plans = ctx.run_layers(self.width, alloc.widths, spaces)
        else:
            plans = stitch(adapter, db, res.levels, alloc.fixup_layer, alloc.widths, cfg.damp, lambda i: H_fix)
        times["final"] = time.perf_counter() - t
        for i, p in plans.items():
            p.stats.update(attn_level=res.levels[2 * i], mlp_level=res.levels[2 * i + 1],
                           search_removed=round(alloc.widths[i].ratio, 4))
        removed = removed_params(spaces, alloc.widths)
        self.summary = {
            "final": cfg.search_final, "levels_per_block": levels, "ffn_step": ffn_step, "seed": settings.seed,
            "database": {"bytes": db_bytes, "dtype": db.index.get("dtype"), "ffn_group": sorted(set(db.ffn_group))},
            "search_dtype": str(search_dtype).removeprefix("torch."),
            "offspring": settings.offspring, "stage_tokens": list(settings.stages),
            "stage_windows": [list(fitness.stage(t)) for t in settings.stages],  # (windows, tokens each)
            "survivors": list(settings.survivors),
            "budget_s": parse_seconds(cfg.search_budget), "generations": res.generations,
            "stopped_by": res.stopped_by, "improvements": res.improvements,
            "starts": {k: (v if k == "chosen" else {"kl": v["kl"]}) for k, v in starts.items()},
            # the KL of the stitched candidates as the search scored them (search dtype, last-stage tokens); the
            # saved model is the best one realised by --search-final, whose own KL is not this
            "kl": {"start": res.start_fitness, "best": res.fitness, "tokens": settings.stages[-1],
                   "of": "stitched candidates"},
            "params": {"target_removed": target, "removed": removed, "off_by": removed - target,
                       "fixup_layer": alloc.fixup_layer, "fixup_channels": alloc.fixup_channels},
            **stats,
            "time_s": {**times, "total": earlier + time.perf_counter() - t0},
            "levels": res.levels,
            "allocation": [{"layer": i, "remove_groups": w.remove_groups, "remove_per_group": w.remove_per_group,
                            "heads": w.heads(s), "kv_heads": w.kv_heads(s), "channels": w.channels,
                            "removed": round(w.ratio, 4)} for i, (s, w) in enumerate(zip(spaces, alloc.widths))],
            "history": res.history,
        }
        log.info("searched allocation: KL %.4f → %.4f in %d generations (%s), %d evaluations; removed %s of %s target",
                 res.start_fitness, res.fitness, res.generations, res.stopped_by, fitness.evaluations,
                 f"{removed:,}", f"{target:,.0f}")
        return plans

    def _search(self, ctx: PruneContext, adapter: Any, db: LevelDatabase, problem: Problem, settings: EvoSettings,
                target: float, journal: _Journal | None, state: dict[str, Any] | None, deadline: float,
                times: dict[str, float]) -> tuple[Any, KLFitness, dict[str, Any], dict[str, int]]:
        """The starts and the evolutionary search over ``db``'s variants stitched into ``adapter``
        (the search-dtype model): the result, the fitness, the starts and the counters."""
        cfg, spaces = ctx.cfg, ctx.spaces
        model = adapter.model
        stitcher = Stitcher(adapter, db)
        last = settings.stages[-1]
        try:
            t = time.perf_counter()
            # windows batched on a GPU (up to --batch-size, and 4 GiB of float32 logits per batch); one at a
            # time on a CPU (no faster batched, and bit-for-bit resumable)
            vocab = model.get_output_embeddings().weight.shape[0]
            batch = max(1, min(cfg.batch_size, 2**32 // (4 * ctx.calib.shape[1] * vocab))) \
                if ctx.device.type == "cuda" else 1
            fitness = KLFitness(adapter, stitcher, ctx.calib[: math.ceil(last / ctx.calib.shape[1])], ctx.device,
                                batch=batch)
            times["dense_logits"] = time.perf_counter() - t

            def set_parent(levels: list[int]) -> None:
                fitness.set_parent(levels, last)

            t = time.perf_counter()
            starts: dict[str, Any] = {}
            if state is not None and "evo" in state:
                start, starts = state["evo"]["parent"], state.get("starts", {})
            else:
                log_w = solve_widths(spaces, ctx.dense_params, cfg.ratio, "log", cfg.first_ratio,
                                     constraint=target_constraint(getattr(cfg, "target", "any"),
                                                                  *model_kind(ctx.model.config)))
                per_unit = []
                for s, w in zip(spaces, log_w):
                    attn_kept = LayerWidth(w.remove_groups, w.remove_per_group, 0, 0).params(s)
                    per_unit += [s.params - s.channels * s.per_channel - attn_kept, (s.channels - w.channels) * s.per_channel]
                log_start = repair(problem, nearest_levels(problem, per_unit), random.Random(cfg.seed))
                # FFN channels only, the same share in every layer (on SmolLM2 at 20 % it beat the log
                # schedule: x2.15 vs x2.50 perplexity), when the FFNs alone can give the budget
                ffn_only = None
                ffn_total = sum(s.channels * s.per_channel for s in spaces)
                if target < ffn_total:
                    share = target / ffn_total
                    want = [0 if u % 2 == 0 else share * spaces[u // 2].channels * spaces[u // 2].per_channel
                            for u in range(problem.units)]
                    ffn_only = repair(problem, nearest_levels(problem, want), random.Random(cfg.seed))
                candidates = {"log": log_start, "errors": error_start(problem, db), "ffn-uniform": ffn_only}
                for name, lv in candidates.items():
                    if lv is not None and problem.valid(lv):  # --target: a repaired start may not be servable
                        starts[name] = {"levels": lv, "kl": fitness(lv, last)}
                if not starts:
                    raise ConfigError("the searched allocation found no start the --target serves; lower --ratio")
                best = min(starts, key=lambda n: starts[n]["kl"])
                start = starts[best]["levels"]
                starts["chosen"] = best
                log.info("search start: %s", ", ".join(f"{n} KL {v['kl']:.4f}" for n, v in starts.items() if n != "chosen")
                         + f" → {best}")
            times["starts"] = time.perf_counter() - t
            if journal is not None:
                journal.extra = {"starts": starts}
            passes0 = fitness.block_passes
            res = evolve(problem, fitness, start, settings, deadline=deadline, journal=journal,
                         set_parent=set_parent, progress=ctx.progress,
                         start_fitness=starts[starts["chosen"]]["kl"] if "chosen" in starts else None)
            times["search"] = res.search_s
            stats = {"evaluations": fitness.evaluations, "window_evaluations": fitness.window_evaluations,
                     "memo_hits": fitness.memo_hits,
                     "block_passes": fitness.block_passes, "search_block_passes": fitness.block_passes - passes0}
        finally:
            stitcher.restore()  # adapter may be the model itself (search dtype = model dtype)
        return res, fitness, starts, stats


@torch.no_grad()
def stitch(adapter: Any, db: LevelDatabase, levels: list[int], fixup_layer: int | None,
           widths: list[LayerWidth], damp: float, hessian: Callable[[int], torch.Tensor] | None = None,
           ) -> dict[int, LayerPlan]:
    """Write the chosen variants into the (dense) model, zero-padded to full size, and return the
    plans that cut it: the unshrunk model then already computes what the shrunk one will.
    ``hessian(i)`` gives the fix-up layer's dense ``down_proj`` Hessian (called before any layer
    is written: it runs the dense model up to that layer)."""
    H_fix = hessian(fixup_layer).float() if fixup_layer is not None and hessian is not None else None
    plans: dict[int, LayerPlan] = {}
    for i, layer in enumerate(adapter.layers):
        plan = LayerPlan()
        o, down = adapter.attention(layer).o, adapter.mlp(layer).down
        geo = adapter.geometry(layer)
        top_a, top_f = len(db.attn_removed[i]) - 1, len(db.ffn_levels[i]) - 1
        la, lf = levels[2 * i], levels[2 * i + 1]
        if la == top_a and db.variant("attn", i, la) is None:  # the block removed (not a --target vllm top level)
            plan.kept_heads = []
            o.weight.zero_()
            if o.bias is not None:
                o.bias.zero_()
        elif la > 0:
            v = db.variant("attn", i, la)
            assert v is not None
            cols = torch.tensor([h * geo.head_dim + d for h in v.kept for d in range(geo.head_dim)])
            o.weight.zero_()
            o.weight[:, cols] = v.weight.to(o.weight.dtype)
            plan.kept_heads, plan.stats["attn_error"] = v.kept, v.error
        channels = widths[i].channels
        if lf == top_f and channels == 0:
            plan.kept_channels = []
            down.weight.zero_()
            if down.bias is not None:
                down.bias.zero_()
        elif channels < db.ffn_levels[i][0]:
            if i == fixup_layer:
                if H_fix is None:
                    raise ValueError("stitching a fixed-up FFN needs its Hessian")
                v = ffn_variant_at(down.weight.data, H_fix, channels, db.ffn_group[i], damp)
            else:
                v = db.variant("ffn", i, lf)
            assert v is not None
            down.weight.zero_()
            down.weight[:, torch.tensor(v.kept)] = v.weight.to(down.weight.dtype)
            plan.kept_channels, plan.stats["mlp_error"] = v.kept, v.error
        s_heads = geo.num_heads if plan.kept_heads is None else len(plan.kept_heads)
        plan.stats.update(heads=s_heads, channels=channels if plan.kept_channels is not None else db.ffn_levels[i][0],
                          kv_heads=len(plan.kept_kv_heads(geo.num_heads, geo.num_kv_heads) or [])
                          if plan.kept_heads is not None else geo.num_kv_heads)
        plans[i] = plan
    return plans
