"""Routing policies for the fleet simulator: (request, workers) -> worker index.

A router is any callable with that signature. It may read each worker's engine (its KV manager at
`worker.core.kv`, `worker.core.stats()`) and the fleet's bookkeeping (`worker.num_active`), and must
not change them. Stateful policies (a round-robin cursor, a seeded RNG) are small classes so that two
runs with the same arguments route identically.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.bench.traces import TraceRequest
    from tandem.sim.fleet import SimWorker

Router = Callable[["TraceRequest", Sequence["SimWorker"]], int]


class RoundRobinRouter:
    """Worker 0, 1, ..., N-1, 0, ... in arrival order (Dynamo's `round_robin`)."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, request: TraceRequest, workers: Sequence[SimWorker]) -> int:
        i = self._next % len(workers)
        self._next = i + 1
        return i


class RandomRouter:
    """A uniformly random worker from a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def __call__(self, request: TraceRequest, workers: Sequence[SimWorker]) -> int:
        return self._rng.randrange(len(workers))


class LeastLoadedRouter:
    """The worker with the fewest unfinished requests now; ties go round-robin, so an idle fleet
    still spreads work instead of piling it on worker 0."""

    def __init__(self) -> None:
        self._tie = 0

    def __call__(self, request: TraceRequest, workers: Sequence[SimWorker]) -> int:
        n = len(workers)
        best, best_load = -1, 0
        for k in range(n):
            i = (self._tie + k) % n
            load = workers[i].num_active
            if best < 0 or load < best_load:
                best, best_load = i, load
        self._tie = (best + 1) % n
        return best


ROUTERS: dict[str, Callable[[], Router]] = {
    "round-robin": RoundRobinRouter,
    "random": RandomRouter,
    "least-loaded": LeastLoadedRouter,
}
"""Built-in routers by CLI name; each call makes a fresh (stateful) instance. Others register here."""


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(sorted(ROUTERS))}") from None
