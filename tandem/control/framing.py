"""Length-prefixed msgpack frames over an asyncio stream, and the connection's batching writer.

Reading: `read_frame` rejects a frame longer than `max_frame_bytes` before reading its body, so a
bad peer cannot make us allocate unbounded memory; the caller then closes the connection.

Writing: `FrameWriter.send` never blocks. Frames queue until the writer task runs; it encodes every
queued frame into one buffer, writes it once and drains once. While a drain waits on a slow reader,
token frames for the same stream merge into the one still queued, so a lagging client gets fewer,
larger chunks instead of an unbounded backlog.

A client's Open frames go by `send_now`: the first of a loop turn is written at once when nothing is
queued and the socket took all that was written before; the rest of the turn's frames queue and leave
together when the writer task runs. A router's notice that a request is coming (sent as the request
reaches the frontend) also goes at once, without taking the turn from that request's own Open.

Why: queued, a request waited for a turn of the frontend's event loop on its way to the worker (2.7 ms
p50, 10 ms p99 at c=16 here), enough to split a closed loop's turnover in the engine (docs/benchmarks.md,
session 19). Every Open written at once cost 7-20% of req/s under stress (sessions 9 and 19): a
burst left in as many writes and reached the engine one by one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

import msgspec

from tandem.protocol.rpc import Fail, Frame, Tokens, merge_outputs

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class FrameError(ConnectionError):
    """The peer sent a frame we cannot accept (too large, or not a valid Frame)."""


def encode_frame(frame: Frame, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame with its length prefix. Raises FrameError if the body exceeds `max_frame_bytes`."""
    buf = bytearray(_HEADER.size)
    _encoder.encode_into(frame, buf, _HEADER.size)
    size = len(buf) - _HEADER.size
    if size > max_frame_bytes:
        raise FrameError(f"frame of {size} bytes exceeds the {max_frame_bytes}-byte limit")
    _HEADER.pack_into(buf, 0, size)
    return bytes(buf)


def decode_frame(body: bytes) -> Frame:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise FrameError(f"malformed frame: {e}") from e


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """The next frame. Raises asyncio.IncompleteReadError at EOF, FrameError on a bad frame."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_frame_bytes:
        raise FrameError(f"peer sent a frame of {size} bytes; the limit is {max_frame_bytes}")
    return decode_frame(await reader.readexactly(size))


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle: a token frame must leave now, not after the peer's delayed ACK."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FrameWriter:
    """Queues frames for one connection and writes them in batches (see the module docstring).

    `on_error(exc)` is called once if a write fails; after `close()` or a failure, sends are dropped.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._writer = writer
        self._max = max_frame_bytes
        self._on_error = on_error
        self._pending: list[Frame | bytes] = []
        # sid -> its Tokens frame in _pending, while that frame is the stream's last queued frame
        # (merging into an earlier one would reorder it after a later End/Fail).
        self._open_tokens: dict[int, Tokens] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._failed = False
        self._wrote_now = False
        self.num_writes = 0
        self.num_frames = 0
        self._task = asyncio.create_task(self._run(), name="frame-writer")

    def send(self, frame: Frame | bytes) -> None:
        """Queue a frame (or an already encoded one, from `encode_frame`)."""
        if self._closed:
            return
        if isinstance(frame, Tokens):
            queued = self._open_tokens.get(frame.sid)
            if queued is not None:
                queued.output = merge_outputs(queued.output, frame.output)
                return
            self._open_tokens[frame.sid] = frame
        elif not isinstance(frame, bytes):
            sid = getattr(frame, "sid", None)
            if sid is not None:
                self._open_tokens.pop(sid, None)
        self._pending.append(frame)
        self._wake.set()

    def send_now(self, data: bytes, *, notice: bool = False) -> None:
        """Write an encoded frame (from `encode_frame`) at once if nothing is queued, the socket took
        all that was written before (so frames keep their order) and no frame went at once since the
        writer task's last turn; otherwise queue it. A `notice` written at once does not count: the
        request it announces sends its Open in the same turn, and that Open should go at once too."""
        if self._wrote_now or self._pending or self._writer.transport.get_write_buffer_size():
            self.send(data)
            return
        if self._closed:
            return
        try:
            self._writer.write(data)
        except Exception as e:  # the connection is gone
            self._fail(e)
            return
        self.num_writes += 1
        self.num_frames += 1
        if not notice:
            self._wrote_now = True  # until the writer task's next turn: a burst leaves in one write
            self._wake.set()

    async def close(self) -> None:
        """Flush what is queued (briefly), then close the socket."""
        if not self._closed:
            self._closed = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
        self._writer.close()

    def abort(self) -> None:
        """Close now, dropping anything queued."""
        self._closed = True
        self._task.cancel()
        self._writer.close()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._wrote_now = False
                frames, self._pending = self._pending, []
                self._open_tokens.clear()
                if frames:
                    self._writer.write(self._encode(frames))
                    self.num_writes += 1
                    self.num_frames += len(frames)
                    await self._writer.drain()
                if self._closed and not self._pending:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reset by peer, broken pipe: the connection is gone
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if not self._failed:
            self._failed = self._closed = True
            if self._on_error is not None:
                self._on_error(e)

    def _encode(self, frames: list[Frame | bytes]) -> bytes:
        buf = bytearray()
        for f in frames:
            if isinstance(f, bytes):
                buf += f
                continue
            try:
                buf += encode_frame(f, self._max)
            except FrameError as e:
                # Only a reply can be oversized here (callers pre-encode what they open); fail that
                # stream rather than the connection.
                log.error("dropping an outgoing frame: %s", e)
                sid = getattr(f, "sid", 0)
                buf += encode_frame(Fail(sid, "internal_error", str(e)), self._max)
        return bytes(buf)
