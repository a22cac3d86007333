"""RequestPhases: where requests spent their time in one engine, as histograms.

    phases.queued(seconds)       a request's first step began `seconds` after it reached the engine
    phases.emitted(req, now)     `req` got a token at `now`: its prefill ended, or one more decode gap

Three phases, each a histogram on the engine's own clock (vLLM exports the same three as
`request_queue_time_seconds`, `request_prefill_time_seconds`, `inter_token_latency_seconds`):

- queue: from reaching the engine (`Request.arrival_time`, stamped when the worker hands it over, so
  waiting for the step under way counts) to the first step that computes it;
- prefill: from that step being scheduled to the first token this engine emits for it (chunks and any
  KV loaded from a peer included; preemptions after the first token are decode time);
- decode: the gaps between its later tokens (inter-token latency, engine side).

A client's latency minus these is what the serving path added. The buckets are the protocol's, so a
frontend can merge and export any worker's counts (`tandem.router.worker_metrics`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tandem.engine.request import Request
from tandem.protocol.registry import GAP_BUCKETS, LATENCY_BUCKETS


@dataclass(slots=True)
class BucketCounts:
    """A histogram's counts per bucket (not cumulative; the last is past every bound) and its sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


@dataclass(slots=True)
class RequestPhases:
    queue: BucketCounts = field(default_factory=lambda: BucketCounts(LATENCY_BUCKETS))
    prefill: BucketCounts = field(default_factory=lambda: BucketCounts(LATENCY_BUCKETS))
    decode: BucketCounts = field(default_factory=lambda: BucketCounts(GAP_BUCKETS))

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def emitted(self, req: Request, now: float) -> None:
        """`req` got a token at `now` (the end of the step that sampled it)."""
        last = req.last_token_time
        if last is None:
            assert req.first_scheduled_time is not None
            self.prefill.observe(now - req.first_scheduled_time)
        else:
            self.decode.observe(now - last)
        req.last_token_time = now
