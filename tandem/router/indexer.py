"""KV indexer: which worker holds which prefix, built from the workers' KV events.

Because block hashes are chained (`tandem.kvcache.hashing`), a hash names a whole prefix, so the
radix tree over token blocks collapses to one map `block hash -> holders`. A request's overlap with
worker w is the number of its leading blocks that w holds:

    request blocks:  h0   h1   h2   h3
    holders:        {A,B} {A,B} {A}  {}      -> overlap A = 3, B = 2

`find_matches` walks the request's blocks once, carrying the set of workers still matching. Each
holder set keeps a 64-bit XOR signature of its members, so a block held by exactly the still-matching
workers (the common case: a prefix is held whole) costs O(1) instead of a set comparison. Cost is
linear in the request's blocks and independent of the number of workers unless holders change.

Events are numbered per worker; a jump in `event_id` means events were lost: the worker is marked
stale (its entries are kept, since most are still right) until `apply_dump` replaces them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheDump, KvEvent

log = logging.getLogger(__name__)

WorkerId = str


class _Holders:
    __slots__ = ("sig", "workers")

    def __init__(self) -> None:
        self.workers: set[WorkerId] = set()
        self.sig = 0


@dataclass
class _WorkerState:
    sig: int
    blocks: set[int] = field(default_factory=set)
    last_event_id: int = -1
    stale: bool = False


class KvIndexer:
    def __init__(self) -> None:
        self._holders: dict[int, _Holders] = {}
        self._workers: dict[WorkerId, _WorkerState] = {}
        self._sig_rng = random.Random(0x7A4D)

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._holders)

    @property
    def num_entries(self) -> int:
        """(block, worker) pairs indexed."""
        return sum(len(w.blocks) for w in self._workers.values())

    def workers(self) -> list[WorkerId]:
        return list(self._workers)

    def is_stale(self, worker: WorkerId) -> bool:
        state = self._workers.get(worker)
        return state is not None and state.stale

    def apply_events(self, worker: WorkerId, events: Iterable[KvEvent]) -> bool:
        """Apply one worker's events in order. Returns False if a gap was seen (resync needed)."""
        state = self._state(worker)
        ok = True
        for ev in events:
            if ev.event_id <= state.last_event_id:
                continue  # already applied (a dump covered it, or a duplicate delivery)
            if ev.event_id != state.last_event_id + 1 and state.last_event_id >= 0:
                if not state.stale:
                    log.warning(
                        "worker %s: KV events %d..%d lost", worker, state.last_event_id + 1, ev.event_id - 1
                    )
                state.stale = True
                ok = False
            state.last_event_id = ev.event_id
            if isinstance(ev, BlockStored):
                for h in ev.block_hashes:
                    self._add(worker, state, h)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    self._remove(worker, state, h)
            elif isinstance(ev, AllBlocksCleared):
                self._clear(worker, state)
        return ok

    def apply_dump(self, worker: WorkerId, dump: KvCacheDump) -> None:
        """Replace everything known about `worker` with its full dump (bootstrap or resync)."""
        state = self._state(worker)
        self._clear(worker, state)
        for h, _parent in dump.blocks:
            self._add(worker, state, h)
        state.last_event_id = dump.last_event_id
        state.stale = False

    def remove_worker(self, worker: WorkerId) -> None:
        """Purge a worker that left (lease expired or drained)."""
        state = self._workers.pop(worker, None)
        if state is not None:
            self._clear(worker, state)

    def find_matches(self, block_hashes: Sequence[int]) -> dict[WorkerId, int]:
        """Overlap depth in blocks for every worker holding at least the request's first block."""
        if not block_hashes:
            return {}
        first = self._holders.get(block_hashes[0])
        if first is None:
            return {}
        active = set(first.workers)
        active_sig = first.sig
        scores: dict[WorkerId, int] = {}
        depth = 1
        for h in block_hashes[1:]:
            holders = self._holders.get(h)
            if holders is None:
                break
            if holders.sig != active_sig or len(holders.workers) != len(active):
                dropped = active - holders.workers
                if dropped:
                    for w in dropped:
                        scores[w] = depth
                        active_sig ^= self._workers[w].sig
                    active -= dropped
                    if not active:
                        break
            depth += 1
        for w in active:
            scores[w] = depth
        return scores

    def _state(self, worker: WorkerId) -> _WorkerState:
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _WorkerState(sig=self._sig_rng.getrandbits(64))
        return state

    def _add(self, worker: WorkerId, state: _WorkerState, h: int) -> None:
        if h in state.blocks:
            return
        state.blocks.add(h)
        holders = self._holders.get(h)
        if holders is None:
            holders = self._holders[h] = _Holders()
        holders.workers.add(worker)
        holders.sig ^= state.sig

    def _remove(self, worker: WorkerId, state: _WorkerState, h: int) -> None:
        if h not in state.blocks:
            return
        state.blocks.discard(h)
        holders = self._holders[h]
        holders.workers.discard(worker)
        holders.sig ^= state.sig
        if not holders.workers:
            del self._holders[h]

    def _clear(self, worker: WorkerId, state: _WorkerState) -> None:
        for h in list(state.blocks):
            self._remove(worker, state, h)
