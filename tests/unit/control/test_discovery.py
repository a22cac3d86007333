"""Discovery: leases, expiry, draining, watch; in memory and through the embedded registry server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from tandem.control.discovery import MemoryDiscovery
from tandem.control.registry import RegistryServer, RemoteDiscovery
from tandem.protocol.registry import WorkerInfo, WorkerLoad


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _info(wid: str = "w1") -> WorkerInfo:
    return WorkerInfo(wid, "127.0.0.1:1", "m", "/models/m", num_blocks=64)


async def test_lease_expires_without_keepalive() -> None:
    clock = FakeClock()
    d = MemoryDiscovery(clock)
    lid = await d.grant(_info(), ttl=3.0)
    clock.now += 2.0
    assert await d.keepalive(lid)
    clock.now += 2.9
    assert [w.worker_id for w in d.snapshot()] == ["w1"]
    clock.now += 0.2
    assert d.snapshot() == []
    assert not await d.keepalive(lid)


async def test_keepalive_updates_info_and_reregistration_replaces() -> None:
    d = MemoryDiscovery(FakeClock())
    lid = await d.grant(_info(), ttl=3.0)
    draining = WorkerInfo("w1", "127.0.0.1:1", "m", "/models/m", status="draining")
    assert await d.keepalive(lid, draining)
    assert d.snapshot()[0].status == "draining"
    await d.grant(_info(), ttl=3.0)  # same worker id again (a restart)
    assert len(d.snapshot()) == 1 and d.snapshot()[0].status == "ready"


async def test_watch_reports_register_update_and_revoke() -> None:
    d = MemoryDiscovery()
    seen: list[list[str]] = []

    async def watcher() -> None:
        async for workers in d.watch():
            seen.append([f"{w.worker_id}:{w.status}" for w in workers])

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.01)
    lease = await d.register(_info(), ttl=3.0)
    await asyncio.sleep(0.01)
    await lease.update(status="draining", load=WorkerLoad(active_requests=2))
    await asyncio.sleep(0.01)
    await lease.revoke()
    await asyncio.sleep(0.01)
    task.cancel()
    assert seen == [[], ["w1:ready"], ["w1:draining"], []]


async def test_watch_wakes_on_expiry() -> None:
    d = MemoryDiscovery()
    await d.grant(_info(), ttl=0.2)
    snapshots = []
    async for workers in d.watch():
        snapshots.append(len(workers))
        if not workers:
            break
    assert snapshots == [1, 0]


@pytest.fixture
async def registry() -> AsyncGenerator[tuple[MemoryDiscovery, RegistryServer], None]:
    store = MemoryDiscovery()
    server = RegistryServer(store)
    await server.start()
    yield store, server
    await server.close()


async def test_embedded_registry_heartbeats_keep_a_worker_alive(registry) -> None:
    store, server = registry
    remote = RemoteDiscovery(server.address)
    lease = await remote.register(_info(), ttl=0.3)
    await asyncio.sleep(0.8)  # > 2 TTLs: only heartbeats (every TTL/3) keep it
    assert [w.worker_id for w in await remote.list()] == ["w1"]
    await lease.update(status="draining")
    assert store.snapshot()[0].status == "draining"
    remote.snapshot()  # starts the background watch
    await asyncio.sleep(0.1)
    assert remote.snapshot()[0].status == "draining"
    lease._task.cancel()  # the worker stalls: heartbeats stop
    await asyncio.sleep(0.5)
    assert store.snapshot() == [] and remote.snapshot() == []
    await remote.close()


async def test_lease_registers_again_after_expiry(registry) -> None:
    store, server = registry
    remote = RemoteDiscovery(server.address)
    lease = await remote.register(_info(), ttl=0.3)
    await store.revoke(lease.lease_id)  # the registry forgot us (restart, partition)
    await asyncio.sleep(0.25)
    assert [w.worker_id for w in store.snapshot()] == ["w1"]
    await lease.revoke()
    assert store.snapshot() == []
    await remote.close()
