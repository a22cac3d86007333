"""KvRouter: the KV-aware routing decision with its state — index, active sequences, metrics.

    route(request)  -> overlaps = indexer.find_matches(request blocks)
                       loads    = active sequences (the router's own count) per candidate
                       worker   = policy.pick_kv(...)             (pure; shared with the simulator)
                       active sequences += the request
    events(worker)  -> indexer.apply_events; False on a gap: the caller fetches a dump -> apply_dump
    first token     -> prefill_done;  finish -> finish

No I/O and no clock of its own (`now` is passed in), so the fleet simulator drives it synchronously on
virtual time and the HTTP router (`router/kv_policy.py`) on the monotonic clock.

Approximate mode (`approx_ttl` set) needs no events: the router predicts that the worker it picked
holds the request's blocks for `approx_ttl` seconds, and indexes that prediction instead. When the
candidates report their KV capacity, each worker's predicted cache is also an LRU of that many
blocks (the prompt's first block the most recent, as an engine frees a sequence tail first), so the
prediction follows how long a prefix really stays cached, which a fixed TTL cannot: on the Mooncake
trace a prefix lives ~100 s in 4 workers' caches and much longer in 8's.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any

import numpy as np

from tandem.protocol.kv_events import BlockRemoved, BlockStored, KvCacheDump, KvEvent
from tandem.router.indexer import KvIndexer
from tandem.router.load import ActiveSequences
from tandem.router.policy import KvPolicyConfig, WorkerLoad, pick_kv_arrays
from tandem.router.slots import WorkerSlots


@dataclass(frozen=True)
class KvRouterConfig:
    block_size: int = 16
    """Tokens per KV block; must equal the workers' block size (hashes are per block)."""
    policy: KvPolicyConfig = field(default_factory=KvPolicyConfig)
    approx_ttl: float | None = None
    """Approximate mode: no KV events; a routed prefix counts as cached there for this many seconds."""
    active_ttl: float = 600.0
    """A routed request never heard of again stops counting as load after this many seconds."""
    decode_load_only: bool = False
    """Count only requests past their prefill as decode load (`active_blocks`); requests still in
    prefill are then load through their queued prefill tokens alone (not counted twice)."""
    seed: int = 0
    """Seeds tie-breaks and softmax sampling, so a replay routes the same way twice."""
    batch_queued_prefill: bool = False
    """Queued prefill that fits in a worker's next step beside the request's own costs nothing
    (candidates' `step_tokens`; see `router/policy.py`). On in Tandem's router, off for Dynamo's."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.approx_ttl is not None and self.approx_ttl <= 0:
            raise ValueError("approx_ttl must be > 0")


@dataclass(frozen=True)
class RouteDecision:
    worker_id: str
    overlap_blocks: int
    """Leading blocks of the request the chosen worker holds (as the index knew it)."""
    num_blocks: int
    prefill_tokens: int
    """Prompt tokens left to compute there."""


class RouterMetrics:
    """Counters a `/metrics` endpoint or a benchmark reads. Decision times: the last 10,000."""

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.predicted_cached_tokens = 0
        """Tokens the index said the chosen worker held (the router's view of the hit rate)."""
        self.shed = 0
        """Requests refused because every candidate was past the busy threshold."""
        self.resyncs = 0
        self.decision_seconds: deque[float] = deque(maxlen=10_000)
        self.decision_seconds_sum = 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.decision_seconds:
            return 0.0
        xs = sorted(self.decision_seconds)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    def snapshot(self) -> dict[str, Any]:
        return {
            "decisions": dict(self.decisions),
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "predicted_hit_rate": self.predicted_cached_tokens / max(self.prompt_tokens, 1),
            "shed": self.shed,
            "resyncs": self.resyncs,
            "decision_p50_ms": self.percentile_ms(0.5),
            "decision_p99_ms": self.percentile_ms(0.99),
        }


class KvRouter:
    def __init__(self, config: KvRouterConfig | None = None) -> None:
        self.config = config or KvRouterConfig()
        self.slots = WorkerSlots()
        self.indexer = KvIndexer(self.slots)
        self.active = ActiveSequences(self.config.active_ttl)
        self.metrics = RouterMetrics()
        self._rng = random.Random(self.config.seed)
        self._predicted: deque[tuple[float, str, list[int]]] = deque()
        self._predicted_until: dict[tuple[str, int], float] = {}
        self._synthetic_ids: Counter[str] = Counter()
        self._predicted_lru: dict[str, OrderedDict[int, None]] = {}
        """Approximate mode: each worker's predicted cache, least recently routed first."""
        # Each worker's load at index `slot`, refreshed for the workers whose load changed since the
        # last decision (`_dirty`), so a decision over 1,000 workers is a few array operations.
        self._load_blocks = np.zeros(0, np.int64)
        self._load_queued = np.zeros(0, np.int64)
        self._overlap = np.zeros(0, np.int64)
        self._dirty: set[str] = set()
        self._slots_of: dict[tuple[str, ...], np.ndarray] = {}
        """Candidate lists seen (ids -> slots): a disaggregated router alternates two."""
        self.others_load: Callable[[tuple[str, ...]], np.ndarray] | None = None
        """Several frontends: the other routers' KV blocks and queued prefill tokens on each of
        the candidates (an array, candidates x 2), added to this router's own."""

    @property
    def approximate(self) -> bool:
        return self.config.approx_ttl is not None

    def route(
        self,
        request_id: str,
        block_hashes: Sequence[int],
        num_tokens: int,
        candidates: Sequence[WorkerLoad],
        *,
        now: float = 0.0,
        overrides: dict[str, Any] | None = None,
        kv_transferred: bool = False,
        block_size: int | None = None,
    ) -> RouteDecision | None:
        """Pick a worker among `candidates` and count the request on it; None if all are busy.

        `candidates` name the workers and their capacity; their load fields are replaced by the
        router's own count (fresher than any report). `overrides` are `KvPolicyConfig` fields for
        this request only (e.g. {"overlap_weight": 0}). `kv_transferred`: the prompt's KV arrives
        from a prefill worker (a disaggregated decode leg), so it is placed by load alone and
        brings no prefill work; `block_hashes` is then not read (may be empty).
        `block_size` (default: the config's) is the candidates' block size, which `block_hashes`
        were computed with.
        """
        t0 = time.perf_counter()
        cfg = self.config
        bs = block_size or cfg.block_size
        policy = replace(cfg.policy, **overrides) if overrides else cfg.policy
        self._dirty.update(self.active.expire(now))
        if self.approximate:
            self._expire_predictions(now)
        ids, slots = self._candidate_slots(candidates)
        self._sync_loads()
        load_blocks, load_queued = self._load_blocks[slots], self._load_queued[slots]
        if self.others_load is not None:  # other frontends' routers, on the same workers
            other = self.others_load(ids)
            load_blocks = load_blocks + other[:, 0]
            load_queued = load_queued + other[:, 1]
        if kv_transferred:
            overlap_of = np.zeros(len(slots), np.int64)
        else:
            self.indexer.overlaps(block_hashes, self._overlap)
            overlap_of = self._overlap[slots]
        capacity = None
        if policy.busy_threshold is not None:
            capacity = np.fromiter(map(attrgetter("capacity_blocks"), candidates), np.int64, len(ids))
        steps = None
        if cfg.batch_queued_prefill:
            steps = np.fromiter(map(attrgetter("step_tokens"), candidates), np.int64, len(ids))
        n = num_tokens // bs if kv_transferred else len(block_hashes)  # full blocks
        i = pick_kv_arrays(
            n,
            overlap_of,
            load_blocks,
            load_queued,
            capacity,
            ids,
            bs,
            policy,
            self._rng,
            steps,
        )
        if i is None:
            self.metrics.shed += 1
            return None
        chosen = ids[i]
        overlap = min(int(overlap_of[i]), n)
        # The engine always computes the last prompt token, even on a full hit.
        prefill = 0 if kv_transferred else max(1, num_tokens - overlap * bs)
        num_blocks = -(-num_tokens // bs)
        self._touch(self.active.worker_of(request_id))  # a retry moves the request
        self.active.add(request_id, chosen, num_blocks, prefill, now)
        self._touch(chosen)
        if self.approximate and not kv_transferred:
            self._predict(chosen, list(block_hashes), now, bs, candidates[i].capacity_blocks)
        m = self.metrics
        m.decisions[chosen] += 1
        m.prompt_tokens += num_tokens
        m.predicted_cached_tokens += num_tokens - prefill
        dt = time.perf_counter() - t0
        m.decision_seconds.append(dt)
        m.decision_seconds_sum += dt
        return RouteDecision(chosen, overlap, n, prefill)

    def prefill_done(self, request_id: str) -> None:
        self._touch(self.active.worker_of(request_id))
        self.active.prefill_done(request_id)

    def finish(self, request_id: str) -> None:
        self._touch(self.active.worker_of(request_id))
        self.active.free(request_id)

    def apply_events(self, worker: str, events: Sequence[KvEvent]) -> bool:
        """Index a worker's events. False: events were lost, fetch a dump and `apply_dump` it.
        Ignored in approximate mode (the index holds predictions there)."""
        if self.approximate:
            return True
        return self.indexer.apply_events(worker, events)

    def apply_dump(self, worker: str, dump: KvCacheDump) -> None:
        if self.approximate:
            return
        self.metrics.resyncs += 1
        self.indexer.apply_dump(worker, dump)

    def remove_worker(self, worker: str) -> None:
        """Purge a worker that left: its index entries and the requests counted on it."""
        self.indexer.remove_worker(worker)
        self.active.remove_worker(worker)
        s = self.slots.get(worker)
        if s is not None:  # free its slot for the next worker: clear what is stored there
            if s < len(self._load_blocks):
                self._load_blocks[s] = self._load_queued[s] = 0
            self.slots.release(worker)
            self._slots_of.clear()
        self._dirty.discard(worker)
        self._synthetic_ids.pop(worker, None)
        self._predicted_lru.pop(worker, None)
        self._predicted_until = {k: v for k, v in self._predicted_until.items() if k[0] != worker}

    def loads(self, workers: Sequence[str]) -> list[WorkerLoad]:
        """The router's view of each worker's load (for metrics and status)."""
        a = self.active
        return [
            WorkerLoad(w, a.active_blocks(w), a.queued_prefill_tokens(w), a.active_requests(w))
            for w in workers
        ]

    def _touch(self, worker: str | None) -> None:
        if worker is not None:
            self._dirty.add(worker)

    def _candidate_slots(self, candidates: Sequence[WorkerLoad]) -> tuple[tuple[str, ...], np.ndarray]:
        """The candidates' ids and slots; cached, since the candidate lists rarely change."""
        ids = tuple(map(attrgetter("worker_id"), candidates))
        slots = self._slots_of.get(ids)
        if slots is None:
            if len(self._slots_of) >= 16:  # membership churn: start over rather than grow
                self._slots_of.clear()
            slots = self._slots_of[ids] = np.fromiter(map(self.slots.slot, ids), np.intp, len(ids))
            self._dirty.update(ids)  # first sight of this list: read every load fresh
        if len(self._load_blocks) < len(self.slots):  # new workers (candidates, or KV events)
            size = max(len(self.slots), 2 * len(self._load_blocks))
            for name in ("_load_blocks", "_load_queued"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros(size - len(old), np.int64)]))
            self._overlap = np.zeros(size, np.int64)
        return ids, slots

    def own_load(self, worker: str) -> tuple[int, int]:
        """This router's load on `worker` as `route` weighs it: KV blocks, queued prefill tokens."""
        a = self.active
        blocks = a.decode_blocks(worker) if self.config.decode_load_only else a.active_blocks(worker)
        return blocks, a.queued_prefill_tokens(worker)

    def _sync_loads(self) -> None:
        slot = self.slots.get
        for w in self._dirty:
            s = slot(w)
            if s is not None:
                self._load_blocks[s], self._load_queued[s] = self.own_load(w)
        self._dirty.clear()

    def _predict(self, worker: str, hashes: list[int], now: float, block_size: int, capacity: int) -> None:
        assert self.config.approx_ttl is not None
        until = now + self.config.approx_ttl
        for h in hashes:
            self._predicted_until[(worker, h)] = until
        self._predicted.append((until, worker, hashes))
        self.indexer.apply_events(worker, [BlockStored(self._event_id(worker), hashes, None, block_size)])
        if capacity <= 0:
            return  # capacity unknown: the TTL alone bounds the prediction
        lru = self._predicted_lru.setdefault(worker, OrderedDict())
        for h in reversed(hashes):  # the first block ends most recent: evicted last
            lru[h] = None
            lru.move_to_end(h)
        if len(lru) > capacity:
            gone = [lru.popitem(last=False)[0] for _ in range(len(lru) - capacity)]
            for h in gone:
                self._predicted_until.pop((worker, h), None)
            self.indexer.apply_events(worker, [BlockRemoved(self._event_id(worker), gone)])

    def _event_id(self, worker: str) -> int:
        """The next id of a predicted event, numbered per worker as a worker numbers its own."""
        eid = self._synthetic_ids[worker]
        self._synthetic_ids[worker] = eid + 1
        return eid

    def _expire_predictions(self, now: float) -> None:
        q = self._predicted
        while q and q[0][0] <= now:
            until, worker, hashes = q.popleft()
            # A later route of the same prefix to the same worker renewed these blocks: keep those.
            gone = [h for h in hashes if self._predicted_until.get((worker, h)) == until]
            lru = self._predicted_lru.get(worker)
            for h in gone:
                del self._predicted_until[(worker, h)]
                if lru is not None:
                    lru.pop(h, None)
            if gone and worker in self._synthetic_ids:
                self.indexer.apply_events(worker, [BlockRemoved(self._event_id(worker), gone)])
