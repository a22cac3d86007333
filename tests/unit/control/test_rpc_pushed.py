"""Pushed results on the request plane: a handler's results written as frames the moment they are
put, the stream ended by a finish or an error, the producer told once when its stream is over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tandem.control.rpc_client import RpcClientPool
from tandem.control.rpc_server import Pushed, ResultSink, RpcServer
from tandem.protocol.errors import OverloadedError, TandemError
from tandem.protocol.messages import EngineOutput, GenerateRequest, SamplingSpec
from tandem.protocol.registry import WorkerLoad, WorkerStats
from tandem.protocol.rpc import Call, GenerateCall


class Producer(Pushed):
    """Stands in for a worker's engine: the test puts the results."""

    def __init__(self, rid: str, refuse: bool) -> None:
        self.rid = rid
        self.refuse = refuse
        self.sink: ResultSink | None = None
        self.closed: list[bool] = []

    def start(self, sink: ResultSink) -> None:
        if self.refuse:
            raise OverloadedError("too busy")
        self.sink = sink

    def close(self, *, finished: bool) -> None:
        self.closed.append(finished)


class PushServer:
    def __init__(self) -> None:
        self.producers: dict[str, Producer] = {}
        self.server = RpcServer(self.handle)

    def handle(self, call: Call) -> Producer:
        assert isinstance(call, GenerateCall)
        p = Producer(call.request.request_id, refuse=call.request.model == "busy")
        self.producers[p.rid] = p
        return p

    def put(self, rid: str, item: Any) -> None:
        sink = self.producers[rid].sink
        assert sink is not None
        sink.put_nowait(item)

    @property
    def num_writes(self) -> int:
        return sum(c.out.num_writes for c in self.server._conns)


def _call(rid: str, model: str = "m") -> GenerateCall:
    return GenerateCall(GenerateRequest(rid, model, [1, 2], SamplingSpec(max_tokens=4)))


async def _until(cond: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def served() -> Any:
    s = PushServer()
    await s.server.start()
    pool = RpcClientPool()
    yield s, pool
    await pool.close()
    await s.server.close()


async def test_pushed_outputs_stream_in_order_and_a_finish_ends_the_stream(served: Any) -> None:
    s, pool = served
    stream = await pool.open(s.server.address, _call("a"))
    await _until(lambda: "a" in s.producers and s.producers["a"].sink is not None)
    s.put("a", EngineOutput("a", [1]))
    s.put("a", WorkerStats("w", "ready", WorkerLoad()))
    s.put("a", EngineOutput("a", [2], finish_reason="length"))
    s.put("a", EngineOutput("a", [3]))  # after the end: dropped
    got = [item async for item in stream]
    assert [type(g).__name__ for g in got] == ["EngineOutput", "WorkerStats", "EngineOutput"]
    assert got[0].new_token_ids == [1] and got[2].finish_reason == "length"
    assert s.producers["a"].closed == [True]
    assert s.server.num_streams == 0


async def test_a_steps_outputs_for_many_streams_leave_in_one_write(served: Any) -> None:
    s, pool = served
    streams = [await pool.open(s.server.address, _call(f"r{i}")) for i in range(8)]
    await _until(lambda: len(s.producers) == 8 and all(p.sink for p in s.producers.values()))
    await asyncio.sleep(0.05)  # the writer is idle
    before = s.num_writes
    for i in range(8):  # what the engine's one callback per step does
        s.put(f"r{i}", EngineOutput(f"r{i}", [i], finish_reason="stop"))
    outs = [[o.new_token_ids async for o in st] for st in streams]
    assert outs == [[[i]] for i in range(8)]
    assert s.num_writes - before == 1


async def test_an_error_ends_the_stream_with_its_code(served: Any) -> None:
    s, pool = served
    for rid, err, expected in [
        ("t", OverloadedError("full"), OverloadedError),
        ("x", RuntimeError("bug"), TandemError),  # an unexpected one: an internal error
    ]:
        stream = await pool.open(s.server.address, _call(rid))
        await _until(lambda rid=rid: rid in s.producers and s.producers[rid].sink is not None)
        s.put(rid, EngineOutput(rid, [1]))
        s.put(rid, err)
        assert (await stream.__anext__()).new_token_ids == [1]
        with pytest.raises(expected) as info:
            await stream.__anext__()
        assert str(err) in str(info.value)
        assert s.producers[rid].closed == [True]


async def test_a_producer_that_refuses_at_start_fails_the_call(served: Any) -> None:
    s, pool = served
    stream = await pool.open(s.server.address, _call("b", model="busy"))
    with pytest.raises(OverloadedError, match="too busy"):
        await stream.__anext__()
    assert s.server.num_streams == 0


async def test_cancelling_stops_the_producer_once_and_drops_what_follows(served: Any) -> None:
    s, pool = served
    stream = await pool.open(s.server.address, _call("c"))
    await _until(lambda: "c" in s.producers and s.producers["c"].sink is not None)
    s.put("c", EngineOutput("c", [1]))
    assert (await stream.__anext__()).new_token_ids == [1]
    writes = s.num_writes
    await stream.aclose()
    await _until(lambda: s.producers["c"].closed == [False])
    s.put("c", EngineOutput("c", [2], finish_reason="length"))
    await asyncio.sleep(0.05)
    assert s.producers["c"].closed == [False]
    assert s.num_writes == writes and s.server.num_streams == 0


async def test_a_client_that_leaves_stops_every_producer(served: Any) -> None:
    s, pool = served
    for i in range(3):
        await pool.open(s.server.address, _call(f"d{i}"))
    await _until(lambda: len(s.producers) == 3 and all(p.sink for p in s.producers.values()))
    await pool.close()
    await _until(lambda: all(p.closed == [False] for p in s.producers.values()))
    assert s.server.num_streams == 0
