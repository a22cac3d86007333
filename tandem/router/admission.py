"""AdmissionQueue: requests that find every worker busy wait here for room, first come first served.

    RouterBackend: place the request (policy.pick) -> BusyError: every worker past its busy limit
                   queue configured -> queue.place(try_place): wait in line, the head retries
                   a request's first output, or its end -> queue.notify(): the head retries now

Bounded twice, so overload never turns into an unbounded hang: at most `max_waiting` requests wait
(the next is refused at once) and each waits at most `timeout` seconds. Both refusals are
OverloadedError, a 503 with Retry-After. Strict FIFO: while anyone waits, a new request queues
behind them instead of taking the room the head is about to get. Only the head retries: when
notified, and every `poll` seconds (a worker that joined, load entries that expired). A waiter that
leaves for any reason (placed, timed out, its client gone) hands the turn to the next.

`AdmissionQueues` keeps one such queue per worker pool (prefill, decode): in disaggregated serving a
request waiting for a decode worker must not hold up the prefill of the requests behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.protocol.errors import BusyError, OverloadedError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
POLL_S = 0.05


def _check_limits(max_waiting: int, timeout: float, poll: float) -> None:
    if max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
    if timeout <= 0 or poll <= 0:
        raise ValueError("timeout and poll must be > 0")


class AdmissionQueue:
    def __init__(self, max_waiting: int, timeout: float = DEFAULT_TIMEOUT_S, poll: float = POLL_S) -> None:
        _check_limits(max_waiting, timeout, poll)
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.poll = poll
        self._line: deque[asyncio.Event] = deque()
        self.queued_total = 0
        """Requests that found every worker busy and waited."""
        self.full_total = 0
        """Requests refused at once: `max_waiting` were already waiting."""
        self.timeouts_total = 0
        """Requests refused after waiting `timeout` seconds."""
        self.wait_seconds_total = 0.0

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def place(self, try_place: Callable[[], T]) -> T:
        """`try_place()`'s result once it stops raising BusyError. Other errors propagate at once."""
        if not self._line:
            try:
                return try_place()
            except BusyError:
                pass
        if len(self._line) >= self.max_waiting:
            self.full_total += 1
            raise OverloadedError(
                f"every worker is busy and {len(self._line)} requests are already waiting; retry shortly"
            )
        me = asyncio.Event()
        self._line.append(me)
        self.queued_total += 1
        started = time.monotonic()
        deadline = started + self.timeout
        just_tried = len(self._line) == 1  # it tried above, on its way in
        try:
            while True:
                head = self._line[0] is me
                if head and not just_tried:
                    try:
                        return try_place()
                    except BusyError:
                        pass
                just_tried = False
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timeouts_total += 1
                    raise OverloadedError(f"every worker stayed busy for {self.timeout:g} s; retry shortly")
                me.clear()
                try:
                    await asyncio.wait_for(me.wait(), min(left, self.poll) if head else left)
                except TimeoutError:
                    pass
        finally:
            was_head = self._line[0] is me
            self._line.remove(me)
            self.wait_seconds_total += time.monotonic() - started
            if was_head and self._line:
                self._line[0].set()  # room may remain for the next

    def notify(self) -> None:
        """Room may have freed on some worker: the head retries now."""
        if self._line:
            self._line[0].set()


class AdmissionQueues:
    """One `AdmissionQueue` per worker pool, all with the same limits, made on first use."""

    def __init__(self, max_waiting: int, timeout: float = DEFAULT_TIMEOUT_S, poll: float = POLL_S) -> None:
        _check_limits(max_waiting, timeout, poll)  # now, not on first use
        self._limits = (max_waiting, timeout, poll)
        self.pools: dict[str, AdmissionQueue] = {}

    def pool(self, name: str) -> AdmissionQueue:
        queue = self.pools.get(name)
        if queue is None:
            queue = self.pools[name] = AdmissionQueue(*self._limits)
        return queue

    def collector(self) -> Collector:
        return _QueueCollector(self)


_METRICS = (
    ("waited", "Requests that waited for a worker", "queued_total"),
    ("full", "Requests refused: the wait queue was full", "full_total"),
    ("timeouts", "Requests refused: every worker stayed busy too long", "timeouts_total"),
    ("wait_seconds", "Time requests spent in the wait queue", "wait_seconds_total"),
)


class _QueueCollector(Collector):
    def __init__(self, queues: AdmissionQueues) -> None:
        self.queues = queues

    def collect(self) -> Iterator[Any]:
        p, pools = "tandem_router_queue", sorted(self.queues.pools.items())
        waiting = GaugeMetricFamily(
            f"{p}_waiting", "Requests waiting for a worker under its busy limit", labels=["pool"]
        )
        for name, q in pools:
            waiting.add_metric([name], q.waiting)
        yield waiting
        for suffix, what, attr in _METRICS:
            family = CounterMetricFamily(f"{p}_{suffix}", what, labels=["pool"])
            for name, q in pools:
                family.add_metric([name], getattr(q, attr))
            yield family

    def describe(self) -> Iterator[Any]:
        return iter(())
