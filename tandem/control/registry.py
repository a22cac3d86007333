"""The embedded registry: a `MemoryDiscovery` served over the request plane, and its client.

The frontend process hosts `RegistryServer` on its own port (no external service); worker processes
reach it through `RemoteDiscovery("127.0.0.1:PORT")`, which implements the same `Discovery`
interface as the in-memory store. Its `snapshot()` is fed by a background watch stream, started on
first use.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tandem.control.discovery import DEFAULT_TTL, Lease, MemoryDiscovery
from tandem.control.rpc_client import RpcClientPool
from tandem.control.rpc_server import RpcServer
from tandem.protocol.errors import InvalidRequestError, TandemError
from tandem.protocol.registry import WorkerInfo
from tandem.protocol.rpc import (
    Ack,
    Call,
    KeepAliveCall,
    LeaseGrant,
    ListCall,
    RegisterCall,
    RevokeCall,
    WatchCall,
    WorkerList,
)

log = logging.getLogger(__name__)


class RegistryServer:
    """Serves `store` on host:port (0: the OS picks; read `address` after `start`)."""

    def __init__(self, store: MemoryDiscovery, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.rpc = RpcServer(self._handle, host=host, port=port, name="registry")

    @property
    def address(self) -> str:
        return self.rpc.address

    async def start(self) -> None:
        await self.rpc.start()

    async def close(self) -> None:
        await self.rpc.close()

    async def _handle(self, call: Call) -> AsyncGenerator[Any, None]:
        store = self.store
        if isinstance(call, RegisterCall):
            if call.ttl <= 0:
                raise InvalidRequestError("ttl must be > 0")
            yield LeaseGrant(await store.grant(call.info, call.ttl), call.ttl)
        elif isinstance(call, KeepAliveCall):
            yield Ack(await store.keepalive(call.lease_id, call.info))
        elif isinstance(call, RevokeCall):
            await store.revoke(call.lease_id)
            yield Ack()
        elif isinstance(call, ListCall):
            yield WorkerList(await store.list())
        elif isinstance(call, WatchCall):
            async for workers in store.watch():
                yield WorkerList(workers)
        else:
            raise InvalidRequestError(f"the registry does not serve {type(call).__name__}")


class RemoteDiscovery:
    """`Discovery` backed by a `RegistryServer` at `address` (host:port)."""

    def __init__(self, address: str, pool: RpcClientPool | None = None) -> None:
        self.address = address
        self._own_pool = pool is None
        self.pool = pool or RpcClientPool(heartbeat_timeout=DEFAULT_TTL * 2)
        self._snapshot: list[WorkerInfo] = []
        self._watch_task: asyncio.Task[None] | None = None

    async def register(self, info: WorkerInfo, ttl: float = DEFAULT_TTL) -> Lease:
        return Lease(self, await self.grant(info, ttl), info, ttl)

    async def grant(self, info: WorkerInfo, ttl: float) -> int:
        reply = await self.pool.call(self.address, RegisterCall(info, ttl))
        assert isinstance(reply, LeaseGrant), f"registry answered {reply!r} to register"
        return reply.lease_id

    async def keepalive(self, lease_id: int, info: WorkerInfo | None = None) -> bool:
        reply = await self.pool.call(self.address, KeepAliveCall(lease_id, info))
        assert isinstance(reply, Ack), f"registry answered {reply!r} to keepalive"
        return reply.ok

    async def revoke(self, lease_id: int) -> None:
        await self.pool.call(self.address, RevokeCall(lease_id))

    async def list(self) -> builtins.list[WorkerInfo]:
        reply = await self.pool.call(self.address, ListCall())
        assert isinstance(reply, WorkerList), f"registry answered {reply!r} to list"
        return reply.workers

    def snapshot(self) -> builtins.list[WorkerInfo]:
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._keep_snapshot(), name="registry-watch")
        return list(self._snapshot)

    async def watch(self) -> AsyncIterator[builtins.list[WorkerInfo]]:
        async with await self.pool.open(self.address, WatchCall()) as stream:
            async for reply in stream:
                assert isinstance(reply, WorkerList), f"registry answered {reply!r} to watch"
                yield reply.workers

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._own_pool:
            await self.pool.close()

    async def _keep_snapshot(self) -> None:
        while True:
            try:
                async for workers in self.watch():
                    self._snapshot = workers
            except TandemError as e:
                log.warning("registry watch at %s broke (%s); retrying", self.address, e)
                self._snapshot = []
            await asyncio.sleep(1.0)
