"""Frame codec bounds and the batching, coalescing writer."""

from __future__ import annotations

import asyncio
import struct

import pytest

from tandem.control.framing import FrameError, FrameWriter, decode_frame, encode_frame, read_frame
from tandem.protocol.messages import EngineOutput, GenerateRequest, SamplingSpec
from tandem.protocol.rpc import End, ExpectCall, Frame, GenerateCall, Open, Ping, Tokens, merge_outputs


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_roundtrip_every_frame_kind() -> None:
    req = GenerateRequest("r1", "m", [1, 2, 3], SamplingSpec(max_tokens=4))
    frames: list[Frame] = [Open(1, GenerateCall(req)), Tokens(1, EngineOutput("r1", [5, 6])), End(1), Ping(7)]
    reader = _reader(b"".join(encode_frame(f) for f in frames))
    assert [await read_frame(reader) for _ in frames] == frames
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)


async def test_oversized_frame_is_rejected_before_reading_it() -> None:
    reader = _reader(struct.pack(">I", 1 << 30))  # claims 1 GiB, sends nothing
    with pytest.raises(FrameError, match="limit"):
        await read_frame(reader, max_frame_bytes=1024)


def test_encoding_an_oversized_frame_raises() -> None:
    big = Tokens(1, EngineOutput("r", list(range(10_000))))
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(big, max_frame_bytes=1000)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\xa3xyz\x01\x02", b"\x92\xa3end\xa1x"])
def test_malformed_frames_raise_frame_error(body: bytes) -> None:
    with pytest.raises(FrameError, match="malformed"):
        decode_frame(body)


def test_merge_outputs_concatenates_and_keeps_the_last_finish() -> None:
    a = EngineOutput("r", [1, 2], new_logprobs=[-0.1, -0.2], num_prompt_tokens=5, engine_ttft_s=0.02)
    b = EngineOutput("r", [3], finish_reason="length", new_logprobs=[-0.3])
    m = merge_outputs(a, b)
    assert m.new_token_ids == [1, 2, 3]
    assert m.new_logprobs == [-0.1, -0.2, -0.3]
    assert m.finish_reason == "length" and m.num_prompt_tokens == 5
    assert m.engine_ttft_s == 0.02  # the first token's engine time survives coalescing


async def _pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result(r)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return await accepted, writer, server


async def test_writer_batches_and_coalesces_queued_tokens() -> None:
    reader, writer, server = await _pair()
    out = FrameWriter(writer)
    # Queued in one loop iteration: the three token frames of sid 1 merge; sid 2 stays separate;
    # End(1) follows the merged frame, and a token frame after End is not merged backwards.
    out.send(Tokens(1, EngineOutput("a", [1])))
    out.send(Tokens(2, EngineOutput("b", [9])))
    out.send(Tokens(1, EngineOutput("a", [2])))
    out.send(Tokens(1, EngineOutput("a", [3], finish_reason="stop")))
    out.send(End(1))
    out.send(Tokens(1, EngineOutput("a", [4])))
    await asyncio.sleep(0.05)
    got = [await read_frame(reader) for _ in range(4)]
    assert got == [
        Tokens(1, EngineOutput("a", [1, 2, 3], finish_reason="stop")),
        Tokens(2, EngineOutput("b", [9])),
        End(1),
        Tokens(1, EngineOutput("a", [4])),
    ]
    assert out.num_writes == 1 and out.num_frames == 4
    await out.close()
    server.close()


def _open(sid: int, num_tokens: int = 3) -> Open:
    req = GenerateRequest(f"r{sid}", "m", [1] * num_tokens, SamplingSpec(max_tokens=4))
    return Open(sid, GenerateCall(req))


async def test_send_now_writes_the_first_frame_of_a_turn_at_once_and_the_rest_together() -> None:
    reader, writer, server = await _pair()
    out = FrameWriter(writer)
    out.send_now(encode_frame(_open(1)))
    assert out.num_writes == 1  # written before this task yields to the loop
    out.send_now(encode_frame(_open(2)))  # same turn: queued ...
    out.send_now(encode_frame(_open(3)))
    assert out.num_writes == 1
    assert [await read_frame(reader) for _ in range(3)] == [_open(1), _open(2), _open(3)]
    assert out.num_writes == 2 and out.num_frames == 3  # ... and the two left in one write
    # Behind a queued frame, a frame sent "now" queues too, so the order holds.
    out.send(Ping(7))
    out.send_now(encode_frame(_open(4)))
    assert [await read_frame(reader) for _ in range(2)] == [Ping(7), _open(4)]
    assert out.num_writes == 3
    await out.close()
    server.close()


async def test_send_now_queues_while_the_socket_has_a_backlog() -> None:
    reader, writer, server = await _pair()
    out = FrameWriter(writer)
    big = _open(1, num_tokens=8_000_000)  # 8 MB: more than the sockets take before the peer reads
    out.send_now(encode_frame(big))
    await asyncio.sleep(0.01)  # the writer task's turn: no other frame has gone at once since
    assert writer.transport.get_write_buffer_size() > 0
    out.send_now(encode_frame(_open(2)))
    assert out.num_writes == 1  # queued behind the backlog
    assert await read_frame(reader) == big
    assert await read_frame(reader) == _open(2)
    assert out.num_writes == 2
    await out.close()
    server.close()


async def test_a_notice_written_at_once_leaves_the_turn_to_the_open_behind_it() -> None:
    reader, writer, server = await _pair()
    out = FrameWriter(writer)
    out.send_now(encode_frame(Open(0, ExpectCall("r1"))), notice=True)
    out.send_now(encode_frame(_open(1)))
    assert out.num_writes == 2  # both went before this task yielded
    assert [await read_frame(reader) for _ in range(2)] == [Open(0, ExpectCall("r1")), _open(1)]
    await out.close()
    server.close()
