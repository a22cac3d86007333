"""KV event publisher: a worker's engine events fanned out to the routers that subscribed.

The engine calls `sink(events)` on its own thread once per step; each subscriber (one `kv_events`
stream per router) gets them on the event loop through a bounded queue:

    engine thread --sink--> call_soon_threadsafe --> subscriber queue --> KvEventBatch frames

A subscriber that falls `max_pending` batches behind loses the new batches instead of growing
without bound; the ids then jump and the router resyncs from a dump (`KvDumpCall`). Embedded: no
broker, each router connects to each worker (NATS replaces this across machines).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from tandem.protocol.kv_events import KvEvent

log = logging.getLogger(__name__)


class KvEventPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 1024) -> None:
        self.loop = loop
        self.max_pending = max_pending
        self._subscribers: set[asyncio.Queue[list[KvEvent]]] = set()
        self.dropped = 0
        """Batches dropped for slow subscribers (each one forces that router to resync)."""

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def sink(self, events: list[KvEvent]) -> None:
        """The engine's `event_sink`: called on the engine thread; never blocks."""
        if self._subscribers:
            self.loop.call_soon_threadsafe(self._fan_out, events)

    def _fan_out(self, events: list[KvEvent]) -> None:
        for q in self._subscribers:
            if q.qsize() >= self.max_pending:
                self.dropped += 1
                continue
            q.put_nowait(events)

    async def subscribe(self) -> AsyncIterator[list[KvEvent]]:
        """Every step's events from now on, until the caller stops iterating."""
        q: asyncio.Queue[list[KvEvent]] = asyncio.Queue()
        self._subscribers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.discard(q)
