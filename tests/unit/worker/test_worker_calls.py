"""A worker's generate calls: handed to the engine as the frame is read, refused or cancelled cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tandem.control.framing import encode_frame, read_frame
from tandem.control.rpc_client import RpcClientPool
from tandem.engine.config import EngineConfig
from tandem.protocol.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from tandem.protocol.messages import GenerateRequest, SamplingSpec
from tandem.protocol.rpc import Cancel, End, GenerateCall, Open, Tokens
from tandem.worker.worker import Worker, WorkerConfig
from tests.sim_model import sim_model_dir


@pytest.fixture
async def worker(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = sim_model_dir(tmp_path)
    cfg = WorkerConfig(
        str(d), engine="sim", worker_id="w0", speedup=1, engine_config=EngineConfig(num_blocks=64)
    )
    w = Worker(cfg)
    await w.start()
    yield w
    await w.stop()


def _call(rid: str, n: int, model: str = "simmodel") -> GenerateCall:
    return GenerateCall(GenerateRequest(rid, model, list(range(1, 200)), SamplingSpec(max_tokens=n)))


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_request_cancelled_in_the_same_read_frees_its_kv(worker: Worker) -> None:
    # Open and Cancel arrive in one write: the request reaches the engine as the Open frame is
    # read, and its stream is cancelled before it ever runs; the engine must still drop it.
    total = worker.stats().num_blocks
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.server.port)
    writer.write(encode_frame(Open(1, _call("gone", 1000))) + encode_frame(Cancel(1)))
    writer.write(encode_frame(Open(2, _call("next", 2))))  # read after the first two frames
    await writer.drain()
    while not isinstance(frame := await asyncio.wait_for(read_frame(reader), 5), End):
        assert isinstance(frame, Tokens) and frame.sid == 2, frame
    assert frame.sid == 2
    await _until(lambda: worker.server.num_streams == 0 and worker._active == 0)
    await _until(lambda: worker.engine is not None and worker.engine.num_active == 0)
    await _until(lambda: worker.stats().num_free_blocks == total)
    writer.close()


async def test_a_client_that_drops_its_connection_mid_stream_frees_every_request(worker: Worker) -> None:
    total = worker.stats().num_blocks
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.server.port)
    writer.write(b"".join(encode_frame(Open(sid, _call(f"r{sid}", 10_000))) for sid in (1, 2, 3)))
    await writer.drain()
    seen: set[int] = set()
    while len(seen) < 3:  # every stream has tokens flowing
        frame = await asyncio.wait_for(read_frame(reader), 5)
        assert isinstance(frame, Tokens)
        if frame.output.new_token_ids:
            seen.add(frame.sid)
    assert worker._active == 3 and worker.stats().num_free_blocks < total
    writer.close()
    await _until(lambda: worker.server.num_streams == 0 and worker._active == 0)
    await _until(lambda: worker.engine is not None and worker.engine.num_active == 0)
    await _until(lambda: worker.stats().num_free_blocks == total)
    assert worker.engine is not None and worker.engine.stats.num_running == 0


async def test_the_stats_are_final_once_the_last_stream_has_ended(tmp_path: Path) -> None:
    # While busy the engine refreshes its stats every few ms, not every step (here a step takes
    # microseconds); once it runs out of work they are final before its last outputs go out.
    cfg = WorkerConfig(str(sim_model_dir(tmp_path)), engine="sim", speedup=10_000)
    worker = Worker(cfg)
    await worker.start()
    total = worker.stats().num_blocks
    pool = RpcClientPool()
    for i in range(3):
        call = _call(f"s{i}", 40, model=worker.model_name)
        tokens = [t async for out in await pool.open(worker.address, call) for t in out.new_token_ids]
        s = worker.stats()
        assert len(tokens) == 40
        assert (s.load.num_running, s.num_free_blocks) == (0, total)
        assert (s.first_tokens_total, s.decode_tokens_total) == (i + 1, 39 * (i + 1))
    await pool.close()
    await worker.stop()


async def test_refusals_arrive_as_errors_and_leave_nothing_active(worker: Worker) -> None:
    pool = RpcClientPool()
    with pytest.raises(ModelNotFoundError, match="serves 'simmodel'"):
        async for _ in await pool.open(worker.address, _call("x", 2, model="other")):
            pass
    tokens = [t async for out in await pool.open(worker.address, _call("ok", 3)) for t in out.new_token_ids]
    assert len(tokens) == 3
    worker.draining = True
    with pytest.raises(OverloadedError, match="draining"):
        async for _ in await pool.open(worker.address, _call("late", 2)):
            pass
    assert worker._active == 0
    await pool.close()


async def test_a_generate_stream_opens_with_its_acceptance(worker: Worker) -> None:
    # The frontend opens its SSE stream on this output, while the prefill still runs.
    pool = RpcClientPool()
    outs = [out async for out in await pool.open(worker.address, _call("acc", 3))]
    assert outs[0].is_acceptance and outs[0].request_id == "acc"
    assert not any(o.is_acceptance for o in outs[1:])
    assert [t for o in outs for t in o.new_token_ids] and sum(len(o.new_token_ids) for o in outs) == 3
    assert outs[-1].finish_reason == "length"
    await pool.close()


async def test_a_request_the_engine_refuses_gets_its_error_and_no_acceptance(worker: Worker) -> None:
    # The frontend answers such a request with its own 4xx, since no acceptance opened the stream.
    pool = RpcClientPool()
    call = GenerateCall(GenerateRequest("long", "simmodel", list(range(1, 3000)), SamplingSpec(max_tokens=2)))
    seen = []
    with pytest.raises(InvalidRequestError, match="context"):
        async for out in await pool.open(worker.address, call):
            seen.append(out)
    assert seen == [] and worker._active == 0
    await pool.close()
