"""Request plane end to end in one process: multiplexing, cancel, errors, peer death, heartbeats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from tandem.control.framing import encode_frame
from tandem.control.rpc_client import RpcClientPool, RpcConnection
from tandem.control.rpc_server import RpcServer
from tandem.protocol.errors import InvalidRequestError, OverloadedError, WorkerLostError
from tandem.protocol.messages import EngineOutput, GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerLoad, WorkerStats
from tandem.protocol.rpc import Call, Cancel, ExpectCall, GenerateCall, Open, StatsCall


class FakeWorker:
    """Streams max_tokens outputs `delay` apart; records cancellations."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.cancelled: list[str] = []
        self.server = RpcServer(self.handle)

    async def handle(self, call: Call) -> AsyncGenerator[Any, None]:
        if isinstance(call, StatsCall):
            yield WorkerStats("w", "ready", WorkerLoad(active_requests=1))
            return
        assert isinstance(call, GenerateCall)
        req = call.request
        if req.model == "busy":
            raise OverloadedError("too busy")
        try:
            for i in range(req.sampling.max_tokens):
                await asyncio.sleep(self.delay)
                last = i == req.sampling.max_tokens - 1
                yield EngineOutput(req.request_id, [i], finish_reason="length" if last else None)
        except asyncio.CancelledError:
            self.cancelled.append(req.request_id)
            raise


def _req(rid: str, n: int, model: str = "m") -> GenerateCall:
    return GenerateCall(GenerateRequest(rid, model, [1, 2], SamplingSpec(max_tokens=n)))


async def _collect(pool: RpcClientPool, address: str, rid: str, n: int) -> list[int]:
    tokens: list[int] = []
    async with await pool.open(address, _req(rid, n)) as stream:
        async for out in stream:
            tokens += out.new_token_ids
    return tokens


async def test_many_concurrent_streams_share_one_connection() -> None:
    w = FakeWorker(delay=0.001)
    await w.server.start()
    pool = RpcClientPool()
    results = await asyncio.gather(*[_collect(pool, w.server.address, f"r{i}", 20) for i in range(50)])
    assert all(r == list(range(20)) for r in results)
    assert len(pool._conns[w.server.address]) == 1
    stats = await pool.call(w.server.address, StatsCall())
    assert stats.load.active_requests == 1
    await pool.close()
    await w.server.close()


async def test_closing_a_stream_cancels_the_call_on_the_server() -> None:
    w = FakeWorker(delay=0.01)
    await w.server.start()
    pool = RpcClientPool()
    stream = await pool.open(w.server.address, _req("long", 10_000))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(100):
        if w.cancelled:
            break
        await asyncio.sleep(0.01)
    assert w.cancelled == ["long"]
    assert w.server.num_streams == 0
    await pool.close()
    await w.server.close()


async def test_server_errors_arrive_as_their_tandem_error() -> None:
    w = FakeWorker()
    await w.server.start()
    pool = RpcClientPool()
    with pytest.raises(OverloadedError, match="too busy"):
        async for _ in await pool.open(w.server.address, _req("x", 3, model="busy")):
            pass
    # The connection survives a failed stream.
    assert await _collect(pool, w.server.address, "y", 3) == [0, 1, 2]
    await pool.close()
    await w.server.close()


async def test_too_large_request_is_refused_locally() -> None:
    w = FakeWorker()
    await w.server.start()
    pool = RpcClientPool(max_frame_bytes=1000)
    call = GenerateCall(GenerateRequest("big", "m", list(range(5000)), SamplingSpec()))
    with pytest.raises(InvalidRequestError, match="too large"):
        await pool.open(w.server.address, call)
    await pool.close()
    await w.server.close()


async def test_server_closes_a_connection_that_sends_an_oversized_frame() -> None:
    w = FakeWorker()
    w.server.max_frame_bytes = 100
    await w.server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", w.server.port)
    writer.write((1000).to_bytes(4, "big"))  # a length prefix over the limit
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)  # a Fail(0, ...) frame, then EOF
    assert b"limit" in data
    writer.close()
    await w.server.close()


async def test_server_death_mid_stream_raises_worker_lost() -> None:
    w = FakeWorker(delay=0.01)
    await w.server.start()
    pool = RpcClientPool()
    stream = await pool.open(w.server.address, _req("r", 10_000))
    await stream.__anext__()
    await w.server.close()
    started = time.monotonic()
    with pytest.raises(WorkerLostError):
        async for _ in stream:
            pass
    assert time.monotonic() - started < 2.0
    await pool.close()


async def test_silent_peer_is_detected_by_heartbeat() -> None:
    async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accepts, never answers: a hung process

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    conn = await RpcConnection.connect(address, heartbeat_interval=0.1, heartbeat_timeout=0.5)
    stream = conn.open(_req("r", 3))
    started = time.monotonic()
    with pytest.raises(WorkerLostError, match="did not answer"):
        await asyncio.wait_for(stream.__anext__(), 5.0)
    assert time.monotonic() - started < 2.0
    await conn.close()
    server.close()


async def test_connect_to_nothing_raises_worker_lost() -> None:
    sock_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = sock_server.sockets[0].getsockname()[1]
    sock_server.close()
    await sock_server.wait_closed()
    with pytest.raises(WorkerLostError, match="cannot connect"):
        await RpcClientPool().open(f"127.0.0.1:{port}", _req("r", 1))


async def test_silent_client_is_dropped_and_its_calls_cancelled() -> None:
    w = FakeWorker(delay=0.01)
    w.server.client_timeout = 0.3
    await w.server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", w.server.port)
    writer.write(encode_frame(Open(1, _req("orphan", 10_000))))  # then never a ping: a vanished host
    await writer.drain()
    for _ in range(200):
        if w.cancelled:
            break
        await asyncio.sleep(0.01)
    assert w.cancelled == ["orphan"]
    writer.close()
    await w.server.close()


class _Recorded:
    """A handler's stream that records being closed (a worker's engine stream aborts there)."""

    def __init__(self, closed: list[str], rid: str) -> None:
        self.closed = closed
        self.rid = rid

    def __aiter__(self) -> _Recorded:
        return self

    async def __anext__(self) -> int:
        await asyncio.sleep(10)
        return 0

    async def aclose(self) -> None:
        self.closed.append(self.rid)


async def test_a_call_cancelled_before_its_stream_starts_is_still_closed() -> None:
    # The handler runs as the Open frame is read (a worker hands the request to its engine
    # there); a Cancel read right behind it must still reach that work.
    started: list[str] = []
    closed: list[str] = []

    def handler(call: Call) -> _Recorded:
        assert isinstance(call, GenerateCall)
        if call.request.model == "busy":
            raise OverloadedError("too busy")
        started.append(call.request.request_id)
        return _Recorded(closed, call.request.request_id)

    server = RpcServer(handler)
    await server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(encode_frame(Open(1, _req("gone", 5))) + encode_frame(Cancel(1)))
    await writer.drain()
    for _ in range(200):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert started == ["gone"] and closed == ["gone"]
    assert server.num_streams == 0
    # A handler that refuses at once: the client gets the error, the connection stays usable.
    pool = RpcClientPool()
    with pytest.raises(OverloadedError, match="too busy"):
        async for _ in await pool.open(server.address, _req("x", 3, model="busy")):
            pass
    stream = await pool.open(server.address, _req("kept", 3))
    await stream.aclose()
    for _ in range(200):
        if "kept" in closed:
            break
        await asyncio.sleep(0.01)
    assert closed == ["gone", "kept"]
    writer.close()
    await pool.close()
    await server.close()


async def test_a_notice_is_acted_on_and_answered_with_nothing() -> None:
    # Open with sid 0: the handler runs for its effect (a worker notes an announced request); the
    # client sends it only on a connection that is already open, and a failing notice is logged,
    # not fatal to the connection.
    noted: list[str] = []
    worker = FakeWorker()

    def handler(call: Call) -> Any:
        if isinstance(call, ExpectCall):
            if call.request_id == "bad":
                raise OverloadedError("draining")
            noted.append(call.request_id)
            return _Recorded([], call.request_id)
        return worker.handle(call)

    server = RpcServer(handler)
    await server.start()
    pool = RpcClientPool()
    assert not pool.notify(server.address, ExpectCall("early"))  # no connection yet: nothing sent
    assert await _collect(pool, server.address, "r", 2) == [0, 1]
    assert pool.notify(server.address, ExpectCall("bad"))
    assert pool.notify(server.address, ExpectCall("a"))
    assert await _collect(pool, server.address, "r2", 2) == [0, 1]  # the frames ahead are read
    assert noted == ["a"] and server.num_streams == 0
    await pool.close()
    await server.close()
