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


class AdmissionQueue:
    def __init__(self, max_waiting: int, timeout: float = DEFAULT_TIMEOUT_S, poll: float = POLL_S) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        if timeout <= 0 or poll <= 0:
            raise ValueError("timeout and poll must be > 0")
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

    def collector(self) -> Collector:
        return _QueueCollector(self)


class _QueueCollector(Collector):
    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        q, p = self.queue, "tandem_router_queue"
        yield GaugeMetricFamily(f"{p}_waiting", "Requests waiting for a worker under its busy limit",
                                value=q.waiting)  # fmt: skip
        yield CounterMetricFamily(f"{p}_waited", "Requests that waited for a worker", value=q.queued_total)
        yield CounterMetricFamily(
            f"{p}_full", "Requests refused: the wait queue was full", value=q.full_total
        )
        yield CounterMetricFamily(
            f"{p}_timeouts", "Requests refused: every worker stayed busy too long", value=q.timeouts_total
        )
        yield CounterMetricFamily(
            f"{p}_wait_seconds", "Time requests spent in the wait queue", value=q.wait_seconds_total
        )

    def describe(self) -> Iterator[Any]:
        return iter(())
