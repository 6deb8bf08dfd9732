"""An evolutionary search over how far each layer is pruned (EvoPress's (1 + lambda) loop).

A candidate is a position on every layer's chain (`planner.search_space`): how many of the
layer's width moves it takes. Summed scores do not predict what a model loses when several
layers are cut at once, so candidates are judged by measurement instead: `fitness(positions,
rows)` is the divergence of the assembled candidate from the dense model on the first `rows`
held-out calibration rows (lower is better; `prunekit.prune.allocation_search` supplies it).

Each generation mutates the parent into `offspring` children that remove the same amount (a
mutation moves one step of removal from a layer to others), then selects in stages of rising
fidelity: every child on a few rows, the best quarter on more, the best one on all rows against
the parent. The loop is seeded and deterministic, and its state is written after every
generation, so that a killed search resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from prunekit.plan.plan import PlanError
from prunekit.plan.planner import SearchSpace

Positions = tuple[int, ...]
STATE_FORMAT = "prunekit.search-state/1"


@dataclass(frozen=True)
class SearchSettings:
    generations: int = 100         # budget in generations...
    minutes: float | None = None   # ...or in wall-clock minutes (whichever ends first)
    offspring: int = 8             # children per generation
    max_mutations: int = 3         # each child moves 1..max_mutations steps of removal between layers
    held_out_rows: int = 32        # calibration rows drawn beyond n_samples for the fitness, never used to build candidates
    seed: int = 0

    def validate(self) -> None:
        for name in ("generations", "offspring", "max_mutations", "held_out_rows"):
            if getattr(self, name) < 1:
                flag = f"--search-{name} or " if name in ("generations", "offspring") else ""
                raise PlanError(f"search {name} must be at least 1, got {getattr(self, name)}; pass a positive "
                                f"{flag}search.{name} in a recipe")
        if self.minutes is not None and not self.minutes > 0:
            raise PlanError(f"search minutes must be positive, got {self.minutes}; leave it unset to stop by generations")

    def stages(self) -> tuple[tuple[int, int], ...]:
        """(held-out rows, candidates kept) of each selection stage: every child on an eighth of the
        rows, the best quarter of them on a quarter, the best one on all rows (against the parent)."""
        rows = self.held_out_rows
        return ((max(1, rows // 8), max(1, self.offspring // 4)), (max(1, rows // 4), 1), (rows, 1))

    def rows_per_generation(self) -> int:
        """Held-out rows run through a candidate model per generation (what a generation costs)."""
        candidates, total = self.offspring, 0
        for rows, keep in self.stages():
            total += candidates * rows
            candidates = keep
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def mutate(parent: Positions, space: SearchSpace, rng: random.Random, max_mutations: int) -> Positions:
    """A child that removes at least `space.goal`, as the parent does: each mutation takes one move
    back in one layer, then takes moves in randomly chosen other layers until the goal is met
    again, then gives back any move the goal does not need."""
    child = list(parent)
    lengths = [c.length for c in space.chains]
    for _ in range(rng.randint(1, max_mutations)):
        down = [i for i, p in enumerate(child) if p > 0]
        if not down:
            break
        lowered = rng.choice(down)
        child[lowered] -= 1
        while space.removed(child) < space.goal:
            up = [i for i, p in enumerate(child) if p < lengths[i] and i != lowered]
            if not up:
                child[lowered] += 1
                break
            child[rng.choice(up)] += 1
        for i in rng.sample(range(len(child)), len(child)):
            if i != lowered and child[i] > 0:
                child[i] -= 1
                if space.removed(child) < space.goal:
                    child[i] += 1
    return tuple(child)


@dataclass
class SearchState:
    """Everything a search needs to go on after a kill: the parent, its fitness, the RNG and the trace."""

    key: str
    generation: int
    parent: Positions
    parent_fitness: float
    rng_state: list
    trace: list[dict] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        data = {"format": STATE_FORMAT, **asdict(self), "parent": list(self.parent)}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path | None, key: str) -> SearchState | None:
        """The saved state of this very search (same key), or None."""
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("format") != STATE_FORMAT or data.get("key") != key:
            return None
        data.pop("format")
        return cls(**{**data, "parent": tuple(data["parent"])})


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


@dataclass(frozen=True)
class SearchResult:
    positions: Positions
    fitness: float
    start_fitness: float
    trace: list[dict]
    evaluations: int
    seconds: float
    resumed_at: int | None

    def to_dict(self) -> dict:
        return {**asdict(self), "positions": list(self.positions)}


def evolve(space: SearchSpace, fitness: Callable[[Positions, int], float], settings: SearchSettings, *,
           state_path: Path | None = None, key: str = "", progress: bool = True) -> SearchResult:
    """Search from `space.start` for the positions of lowest `fitness` (see the module docstring)."""
    settings.validate()
    rng = random.Random(settings.seed)
    stages = settings.stages()
    full_rows = stages[-1][0]
    state = SearchState.load(state_path, key)
    resumed_at = state.generation if state is not None else None
    if state is None:
        start_fitness = fitness(space.start, full_rows)
        state = SearchState(key, 0, space.start, start_fitness, _rng_state(rng), evaluations=1,
                            trace=[{"generation": 0, "fitness": start_fitness, "accepted": True}])
    _set_rng_state(rng, state.rng_state)
    start_fitness = state.trace[0]["fitness"]
    began = time.perf_counter() - state.seconds
    bar = tqdm(total=settings.generations, initial=state.generation, desc="allocation search", disable=not progress)
    try:
        while state.generation < settings.generations:
            if settings.minutes is not None and time.perf_counter() - began > settings.minutes * 60:
                break
            children = list(dict.fromkeys(mutate(state.parent, space, rng, settings.max_mutations)
                                          for _ in range(settings.offspring)))
            children = [c for c in children if c != state.parent] or children
            for rows, keep in stages:
                measured = sorted(((fitness(c, rows), c) for c in children), key=lambda fc: (fc[0], fc[1]))
                state.evaluations += len(children)
                children = [c for _, c in measured[:keep]]
            best_fitness, best = measured[0]
            accepted = best_fitness < state.parent_fitness
            if accepted:
                state.parent, state.parent_fitness = best, best_fitness
            state.generation += 1
            state.trace.append({"generation": state.generation, "fitness": state.parent_fitness,
                                "child_fitness": best_fitness, "accepted": accepted})
            state.rng_state = _rng_state(rng)
            state.seconds = time.perf_counter() - began
            if state_path is not None:
                state.save(state_path)
            bar.update(1)
            bar.set_postfix(fitness=f"{state.parent_fitness:.4f}", start=f"{start_fitness:.4f}")
    finally:
        bar.close()
    return SearchResult(state.parent, state.parent_fitness, start_fitness, state.trace, state.evaluations,
                        round(time.perf_counter() - began, 1), resumed_at)


__all__ = ["SearchResult", "SearchSettings", "SearchState", "evolve", "mutate"]
