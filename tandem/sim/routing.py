"""Routing policies for the fleet simulator: (request, workers) -> worker index.

A router is any callable with that signature. It may read each worker's engine (its KV manager at
`worker.core.kv`, `worker.core.stats()`) and the fleet's bookkeeping (`worker.num_active`), and must
not change them. Stateful policies (a round-robin cursor, a seeded RNG) are small classes so that two
runs with the same arguments route identically.

A router may also observe the fleet (`FleetObserver`): `attach(workers)` once before the run (the KV
router installs each engine's KV event sink there, so events reach its index the step they happen),
and `on_output(t, output)` for every output as it becomes visible (first token: prefill done;
finish: free). The fleet names request i "i" and routes it when it arrives, or later (again) while
the router finds every worker busy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tandem.kvcache.hashing import block_hashes
from tandem.protocol.kv_events import KvEvent
from tandem.protocol.messages import EngineOutput
from tandem.router.basic import APPROX_TTL_S
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.kv_policy import TUNED
from tandem.router.policy import WorkerLoad

if TYPE_CHECKING:
    from tandem.bench.traces import TraceRequest
    from tandem.sim.fleet import SimWorker

Router = Callable[["TraceRequest", Sequence["SimWorker"], int, float], int | None]
"""(request, workers, request id, now) -> the worker's index, or None when every worker is past the
router's busy limit. The id names the request in its engine and in `on_output`."""


class RoundRobinRouter:
    """Worker 0, 1, ..., N-1, 0, ... in arrival order (Dynamo's `round_robin`)."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(
        self, request: TraceRequest, workers: Sequence[SimWorker], request_id: int = 0, now: float = 0.0
    ) -> int:
        i = self._next % len(workers)
        self._next = i + 1
        return i


class RandomRouter:
    """A uniformly random worker from a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def __call__(
        self, request: TraceRequest, workers: Sequence[SimWorker], request_id: int = 0, now: float = 0.0
    ) -> int:
        return self._rng.randrange(len(workers))


class LeastLoadedRouter:
    """The worker with the fewest unfinished requests now; ties go round-robin, so an idle fleet
    still spreads work instead of piling it on worker 0."""

    def __init__(self) -> None:
        self._tie = 0

    def __call__(
        self, request: TraceRequest, workers: Sequence[SimWorker], request_id: int = 0, now: float = 0.0
    ) -> int:
        n = len(workers)
        best, best_load = -1, 0
        for k in range(n):
            i = (self._tie + k) % n
            load = workers[i].num_active
            if best < 0 or load < best_load:
                best, best_load = i, load
        self._tie = (best + 1) % n
        return best


class KvSimRouter:
    """The HTTP router's `KvRouter` driven on the fleet's virtual clock, fed by each engine's events.

    `config.block_size` is replaced by the engines' block size at `attach`. With `config.approx_ttl`
    set it ignores events and predicts the cache from its own decisions (`kv-approx`).
    """

    def __init__(self, config: KvRouterConfig | None = None) -> None:
        self.config = config or KvRouterConfig()
        self.kv = KvRouter(self.config)
        self._loads: list[WorkerLoad] = []
        self._started: set[str] = set()

    def attach(self, workers: Sequence[SimWorker]) -> None:
        bs = workers[0].core.config.block_size
        if bs != self.config.block_size:
            self.config = replace(self.config, block_size=bs)
            self.kv = KvRouter(self.config)
        self._loads = [
            WorkerLoad(
                str(w.index),
                capacity_blocks=w.core.kv.num_blocks,
                step_tokens=w.core.config.max_num_batched_tokens,
            )
            for w in workers
        ]
        if self.config.approx_ttl is None:
            for w in workers:
                w.core.event_sink = self._sink(str(w.index))

    def _sink(self, worker: str) -> Callable[[list[KvEvent]], None]:
        kv = self.kv

        def sink(events: list[KvEvent]) -> None:
            # In one process nothing is lost: a gap here is a bug, not a resync.
            assert kv.apply_events(worker, events), f"KV event gap from sim worker {worker}"

        return sink

    def __call__(
        self, request: TraceRequest, workers: Sequence[SimWorker], request_id: int, now: float
    ) -> int | None:
        hashes = block_hashes(request.prompt_token_ids(), self.config.block_size)
        decision = self.kv.route(str(request_id), hashes, request.input_len, self._loads, now=now)
        return None if decision is None else int(decision.worker_id)

    def on_output(self, t: float, out: EngineOutput) -> None:
        rid = out.request_id
        if out.finish_reason is not None:
            self.kv.finish(rid)
            self._started.discard(rid)
        elif rid not in self._started:
            self._started.add(rid)
            self.kv.prefill_done(rid)


def kv_router(**policy: Any) -> Callable[[], Router]:
    """A factory of KV routers with `KvPolicyConfig` fields set (for sweeps)."""
    from tandem.router.policy import KvPolicyConfig

    return lambda: KvSimRouter(KvRouterConfig(policy=KvPolicyConfig(**policy)))


ROUTERS: dict[str, Callable[[], Router]] = {
    "round-robin": RoundRobinRouter,
    "random": RandomRouter,
    "least-loaded": LeastLoadedRouter,
    "kv": lambda: KvSimRouter(KvRouterConfig(policy=TUNED, batch_queued_prefill=True)),
    "kv-approx": lambda: KvSimRouter(
        KvRouterConfig(policy=TUNED, approx_ttl=APPROX_TTL_S, batch_queued_prefill=True)
    ),
    "kv-dynamo": KvSimRouter,
}
"""Built-in routers by CLI name; each call makes a fresh (stateful) instance. Others register here.
`kv-dynamo` is the KV router with Dynamo's default weights (1, 1, 1), for side-by-side runs."""


def make_router(name: str, kv_policy: Mapping[str, float] | None = None) -> Router:
    """A fresh router by CLI name; `kv_policy` fields replace the KV routers' weights (`kv`,
    `kv-approx`: the tuned ones; `kv-dynamo`: Dynamo's defaults)."""
    try:
        router = ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(sorted(ROUTERS))}") from None
    if not kv_policy:
        return router
    if not isinstance(router, KvSimRouter):
        raise ValueError(f"router weights apply to the KV routers only, not {name!r}")
    config = router.config
    return KvSimRouter(replace(config, policy=replace(config.policy, **kv_policy)))
