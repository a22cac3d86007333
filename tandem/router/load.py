"""Active sequences: the router's own, always-fresh view of each worker's load.

A worker's published load is up to a load interval old; a burst of requests routed in the meantime
would all see the same idle worker. So the router counts what it sent:

    route(r -> w)        active_blocks[w] += blocks(r);  queued_prefill[w] += uncached tokens of r
    first token of r     queued_prefill[w] -= uncached tokens of r     (its prefill is done)
    finish / cancel r    active_blocks[w] -= blocks(r)                 (its KV is freed)

Entries that never hear back (a lost stream) expire after `ttl` seconds so they cannot pin load
forever. Pure bookkeeping: no I/O, and the clock is passed in, so the simulator drives it on virtual
time and the HTTP router on the monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Seq:
    worker: str
    blocks: int
    prefill_tokens: int
    """Uncached prompt tokens still to prefill; 0 once the first token came back."""
    expires: float


@dataclass(slots=True)
class _Worker:
    active_blocks: int = 0
    decode_blocks: int = 0
    """Blocks of the requests past their prefill (what a decode step reads)."""
    queued_prefill_tokens: int = 0
    active_requests: int = 0


class ActiveSequences:
    """Per-worker active blocks, queued prefill tokens and request counts, from routing decisions."""

    def __init__(self, ttl: float = 600.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        self.ttl = ttl
        self._seqs: dict[str, _Seq] = {}
        self._workers: dict[str, _Worker] = {}
        self._next_expiry = float("inf")

    def __len__(self) -> int:
        return len(self._seqs)

    def add(self, request_id: str, worker: str, blocks: int, prefill_tokens: int, now: float = 0.0) -> None:
        """Count a request routed to `worker`: `blocks` KV blocks, `prefill_tokens` left to compute.
        Adding an id already present first frees the old entry (a retry on another worker)."""
        if request_id in self._seqs:
            self.free(request_id)
        expires = now + self.ttl
        self._seqs[request_id] = _Seq(worker, blocks, prefill_tokens, expires)
        w = self._workers.setdefault(worker, _Worker())
        w.active_blocks += blocks
        w.queued_prefill_tokens += prefill_tokens
        w.active_requests += 1
        self._next_expiry = min(self._next_expiry, expires)

    def prefill_done(self, request_id: str) -> None:
        """The request's first token arrived: its prompt no longer waits for prefill."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.prefill_tokens == 0:
            return
        w = self._workers[seq.worker]
        w.queued_prefill_tokens -= seq.prefill_tokens
        w.decode_blocks += seq.blocks
        seq.prefill_tokens = 0

    def free(self, request_id: str) -> None:
        """The request finished, failed or was cancelled. Unknown ids are ignored."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        w = self._workers[seq.worker]
        w.active_blocks -= seq.blocks
        if seq.prefill_tokens:
            w.queued_prefill_tokens -= seq.prefill_tokens
        else:
            w.decode_blocks -= seq.blocks
        w.active_requests -= 1

    def remove_worker(self, worker: str) -> None:
        """Forget a worker that left, and every request counted on it."""
        for rid in [rid for rid, s in self._seqs.items() if s.worker == worker]:
            del self._seqs[rid]
        self._workers.pop(worker, None)

    def expire(self, now: float) -> set[str]:
        """Free entries older than `ttl`. Returns the workers whose load changed (usually none:
        cheap when nothing is due)."""
        if now < self._next_expiry:
            return set()
        due = [(rid, s.worker) for rid, s in self._seqs.items() if s.expires <= now]
        for rid, _ in due:
            self.free(rid)
        self._next_expiry = min((s.expires for s in self._seqs.values()), default=float("inf"))
        return {w for _, w in due}

    def active_blocks(self, worker: str) -> int:
        w = self._workers.get(worker)
        return w.active_blocks if w else 0

    def decode_blocks(self, worker: str) -> int:
        w = self._workers.get(worker)
        return w.decode_blocks if w else 0

    def queued_prefill_tokens(self, worker: str) -> int:
        w = self._workers.get(worker)
        return w.queued_prefill_tokens if w else 0

    def active_requests(self, worker: str) -> int:
        w = self._workers.get(worker)
        return w.active_requests if w else 0

    def worker_of(self, request_id: str) -> str | None:
        seq = self._seqs.get(request_id)
        return seq.worker if seq else None
