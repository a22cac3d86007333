"""Discovery: which workers are alive, what they serve, and how loaded they are.

The shape follows etcd so that an etcd implementation slots in without changing callers: a worker
`register`s its `WorkerInfo` under a lease with a TTL; the returned `Lease` keeps itself alive with a
heartbeat every TTL/3 and carries load/status updates; a worker whose heartbeats stop disappears
when its TTL runs out. Readers `list()` live workers, keep a local `snapshot()`, or `watch()` for
changes.

Implementations: `MemoryDiscovery` (this module: one process; the embedded registry's store and the
test double) and `RemoteDiscovery` (control/registry.py: a client of the embedded registry server).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from tandem.protocol.errors import InvalidRequestError
from tandem.protocol.registry import Status, WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)

DEFAULT_TTL = 3.0


class LeaseStore(Protocol):
    """The etcd-shaped primitives a `Lease` needs (lease grant + put, keepalive, revoke)."""

    async def grant(self, info: WorkerInfo, ttl: float) -> int: ...

    async def keepalive(self, lease_id: int, info: WorkerInfo | None = None) -> bool:
        """Refresh the lease (and replace its info when given). False if the lease expired."""
        ...

    async def revoke(self, lease_id: int) -> None: ...


class Discovery(LeaseStore, Protocol):
    async def register(self, info: WorkerInfo, ttl: float = DEFAULT_TTL) -> Lease:
        """Publish `info` until the returned lease is revoked or its heartbeats stop for `ttl` s."""
        ...

    async def list(self) -> builtins.list[WorkerInfo]:
        """Live workers (ready and draining), fresh from the store."""
        ...

    def snapshot(self) -> builtins.list[WorkerInfo]:
        """Live workers as last seen locally; cheap, never blocks (remote stores keep it by watch)."""
        ...

    def watch(self) -> AsyncIterator[builtins.list[WorkerInfo]]:
        """The live workers now, then again after every change (register, update, expiry, revoke).
        Level-triggered: changes faster than the reader coalesce into the latest snapshot."""
        ...

    async def close(self) -> None: ...


class Lease:
    """A live registration. Heartbeats run in a task until `revoke()`; if the store forgot the lease
    (it expired while we were stalled, or the registry restarted) the next heartbeat registers anew."""

    def __init__(self, store: LeaseStore, lease_id: int, info: WorkerInfo, ttl: float) -> None:
        self.store = store
        self.lease_id = lease_id
        self.ttl = ttl
        self._info = info
        self._dirty = False
        self._revoked = False
        self._task = asyncio.create_task(self._heartbeat(), name=f"lease-{info.worker_id}")

    @property
    def info(self) -> WorkerInfo:
        return self._info

    async def update(self, *, load: WorkerLoad | None = None, status: Status | None = None) -> None:
        """Publish new load or status now (a failure is retried by the next heartbeat)."""
        changes: dict = {}
        if load is not None:
            changes["load"] = load
        if status is not None:
            changes["status"] = status
        self._info = msgspec.structs.replace(self._info, **changes)
        self._dirty = True
        try:
            await self._beat()
        except Exception as e:
            log.warning("lease %s: update failed, will retry: %s", self.lease_id, e)

    async def revoke(self) -> None:
        """Remove the registration now. Safe to call twice."""
        if self._revoked:
            return
        self._revoked = True
        self._task.cancel()
        try:
            await self.store.revoke(self.lease_id)
        except Exception as e:  # the entry will expire by TTL anyway
            log.warning("lease %s: revoke failed: %s", self.lease_id, e)

    async def _beat(self) -> None:
        dirty, self._dirty = self._dirty, False
        try:
            ok = await self.store.keepalive(self.lease_id, self._info if dirty else None)
        except BaseException:
            self._dirty = self._dirty or dirty
            raise
        if not ok and not self._revoked:
            self.lease_id = await self.store.grant(self._info, self.ttl)
            log.warning("worker %s: lease had expired; registered again", self._info.worker_id)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease %s: heartbeat failed: %s", self.lease_id, e)


@dataclass
class _Entry:
    info: WorkerInfo
    ttl: float
    deadline: float


class MemoryDiscovery:
    """In-process registry. Expiry is evaluated lazily on every read and by watchers' timers, so no
    background task is needed. `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._version = 0
        self._changed: asyncio.Event | None = None

    async def register(self, info: WorkerInfo, ttl: float = DEFAULT_TTL) -> Lease:
        return Lease(self, await self.grant(info, ttl), info, ttl)

    async def grant(self, info: WorkerInfo, ttl: float) -> int:
        assert ttl > 0, "a lease needs a positive TTL"
        self._check_kv_layout(info)
        # A worker that re-registers (restart, expired lease) replaces its old entry.
        for lid, e in list(self._entries.items()):
            if e.info.worker_id == info.worker_id:
                del self._entries[lid]
        lease_id = next(self._ids)
        self._entries[lease_id] = _Entry(info, ttl, self._clock() + ttl)
        log.info("registered %s at %s (%s, lease %d)", info.worker_id, info.address, info.model, lease_id)
        self._bump()
        return lease_id

    def _check_kv_layout(self, info: WorkerInfo) -> None:
        """Workers of one model must lay out KV blocks alike, or a transfer would corrupt output."""
        if info.kv_layout is None:
            return
        for e in self._entries.values():
            other = e.info
            if other.worker_id == info.worker_id or other.model != info.model or other.kv_layout is None:
                continue
            diffs = info.kv_layout.differences(other.kv_layout)
            if diffs:
                raise InvalidRequestError(
                    f"worker {info.worker_id} cannot join model {info.model!r}: its KV layout differs from "
                    f"worker {other.worker_id}'s (" + "; ".join(diffs) + ")"
                )

    async def keepalive(self, lease_id: int, info: WorkerInfo | None = None) -> bool:
        self._expire()
        entry = self._entries.get(lease_id)
        if entry is None:
            return False
        entry.deadline = self._clock() + entry.ttl
        if info is not None and info != entry.info:
            if info.status != entry.info.status:
                log.info("worker %s is now %s", info.worker_id, info.status)
            entry.info = info
            self._bump()
        return True

    async def revoke(self, lease_id: int) -> None:
        entry = self._entries.pop(lease_id, None)
        if entry is not None:
            log.info("deregistered %s", entry.info.worker_id)
            self._bump()

    async def list(self) -> builtins.list[WorkerInfo]:
        return self.snapshot()

    def snapshot(self) -> builtins.list[WorkerInfo]:
        self._expire()
        return [e.info for e in self._entries.values()]

    async def watch(self) -> AsyncIterator[builtins.list[WorkerInfo]]:
        seen = -1
        while True:
            self._expire()
            if self._version != seen:
                seen = self._version
                yield [e.info for e in self._entries.values()]
                continue
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            deadlines = [e.deadline for e in self._entries.values()]
            timeout = max(0.0, min(deadlines) - self._clock()) + 0.01 if deadlines else None
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                pass

    async def close(self) -> None:
        pass

    def _expire(self) -> None:
        now = self._clock()
        dead = [lid for lid, e in self._entries.items() if e.deadline <= now]
        for lid in dead:
            log.warning("worker %s missed its heartbeats: lease expired", self._entries[lid].info.worker_id)
            del self._entries[lid]
        if dead:
            self._bump()

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None:
            # Wake every watcher once; the next wait gets a fresh event.
            self._changed.set()
            self._changed = None
