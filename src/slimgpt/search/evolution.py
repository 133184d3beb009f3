"""The evolutionary search over level assignments (EvoPress-style (1+λ) with multi-step selection).

Each generation makes ``offspring`` children of the parent, each by 1..``max_mutations`` level
switches (:func:`~slimgpt.search.levels.mutate`, so every child is on the budget lattice). Selection
runs in stages on growing token counts: all children are scored on ``stages[0]`` calibration tokens,
the best ``survivors[0]`` are re-scored on ``stages[1]`` tokens, and so on (what a stage's tokens are
is the fitness's business: :meth:`~slimgpt.search.fitness.KLFitness.stage`); the last stage's best
replaces the parent only if it beats the parent's fitness on the same (last-stage) tokens.

**Reproducible and resumable.** Generation ``g`` draws from ``random.Random(f"{seed}:{g}")``, so
the result depends on the seed and the number of generations only, not on when a run was
interrupted: the journal (``OUT.search.json``) holds the parent, its fitness and the counters after
every generation, and a resumed run continues from the next generation to the same result.
The time budget stops the search between generations (recorded with the result).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from slimgpt.search.levels import Problem, mutate

log = logging.getLogger(__name__)


class Fitness(Protocol):
    def __call__(self, levels: list[int], n: int) -> float: ...


@dataclass
class EvoSettings:
    offspring: int = 16
    stages: tuple[int, ...] = (1, 4, 16)  # the fitness's size argument per selection stage (KLFitness: tokens)
    survivors: tuple[int, ...] = (4, 1)  # kept after every stage but the last
    max_mutations: int = 3
    generations: int = 1000
    seed: int = 0


@dataclass
class EvoResult:
    levels: list[int]
    fitness: float
    start_fitness: float
    generations: int
    improvements: int
    evaluations: int
    search_s: float
    stopped_by: str  # "generations" | "budget"
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evolve(
    problem: Problem,
    fitness: Fitness,
    start: list[int],
    settings: EvoSettings,
    *,
    deadline: float | None = None,
    journal: Any = None,
    set_parent: Callable[[list[int]], None] | None = None,
    progress: bool = True,
    start_fitness: float | None = None,
) -> EvoResult:
    """Search from ``start`` (on the lattice) for ``settings.generations`` generations or until
    ``time.perf_counter()`` passes ``deadline``. ``set_parent`` is told every new parent (to cache
    its activations); ``journal`` (a :class:`~slimgpt.methods.blockpruner.SearchJournal`) records
    each generation and, when it holds some, the search continues from them. ``start_fitness``
    (the start's last-stage fitness, if known) lets a search whose budget is already spent return
    the start without another pass."""
    if len(settings.survivors) != len(settings.stages) - 1:
        raise ValueError("give one survivor count per stage but the last")
    if not problem.feasible(start):
        raise ValueError("the start is not on the budget lattice")
    last = settings.stages[-1]
    state = journal.load() if journal is not None else None
    if state is not None and "evo" in state:
        evo = state["evo"]
        parent, parent_fit = evo["parent"], evo["fitness"]
        gen, improvements, evaluations = evo["generation"], evo["improvements"], evo["evaluations"]
        history, earlier_s, start_fit = evo["history"], evo["search_s"], evo["start_fitness"]
        log.info("resuming the allocation search from %s: %d generations done", journal.path, gen)
        if set_parent is not None:
            set_parent(parent)
    else:
        parent = list(start)
        if deadline is not None and start_fitness is not None and time.perf_counter() >= deadline:
            return EvoResult(parent, start_fitness, start_fitness, 0, 0, 0, 0.0, "budget")  # no pass wasted
        if set_parent is not None:
            set_parent(parent)
        parent_fit = fitness(parent, last)
        start_fit, gen, improvements, evaluations, history, earlier_s = parent_fit, 0, 0, 1, [], 0.0
    t0 = time.perf_counter()
    stopped_by = "generations"
    bar = tqdm(total=settings.generations, initial=gen, desc="search: generations", disable=not progress)
    bar.set_postfix(best_kl=f"{parent_fit:.4f}")
    gen_s = 0.0
    while gen < settings.generations:
        now = time.perf_counter()
        if deadline is not None and now + gen_s > deadline:
            stopped_by = "budget"
            break
        rng = random.Random(f"{settings.seed}:{gen}")
        children: list[list[int]] = []
        seen = {tuple(parent)}
        for _ in range(settings.offspring * 4):
            if len(children) == settings.offspring:
                break
            child: list[int] | None = parent
            for _ in range(rng.randint(1, settings.max_mutations)):
                nxt = mutate(problem, child, rng)
                child = nxt if nxt is not None else child
            if child is not None and tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        if not children:
            stopped_by = "no moves"
            break
        scored: list[tuple[float, int]] = []
        pool = list(range(len(children)))
        for k, n in enumerate(settings.stages):
            scored = sorted((fitness(children[j], n), j) for j in pool)
            evaluations += len(pool)
            if k < len(settings.survivors):
                pool = [j for _, j in scored[: settings.survivors[k]]]
        best_fit, best = scored[0]
        gen += 1
        if best_fit < parent_fit:
            parent, parent_fit = children[best], best_fit
            improvements += 1
            if set_parent is not None:
                set_parent(parent)
        history.append({"generation": gen, "fitness": parent_fit, "candidate": best_fit})
        bar.update(1)
        bar.set_postfix(best_kl=f"{parent_fit:.4f}")
        gen_s = time.perf_counter() - now
        if journal is not None:
            journal.save({"evo": {"parent": parent, "fitness": parent_fit, "generation": gen,
                                  "improvements": improvements, "evaluations": evaluations, "history": history,
                                  "search_s": earlier_s + time.perf_counter() - t0, "start_fitness": start_fit}})
    bar.close()
    return EvoResult(parent, parent_fit, start_fit, gen, improvements, evaluations,
                     earlier_s + time.perf_counter() - t0, stopped_by, history)
