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

From another thread: `send_from_thread` writes encoded frames on that thread, under a lock that
every queue change and write takes, when nothing is queued and the transport holds no unsent bytes;
otherwise it queues them for the writer task. A worker's engine thread writes its tokens this way.
Why: handed to the loop thread first, every step's tokens cost a wake-up of that thread, and on a
2-vCPU VM a wake-up aimed at an idle vCPU now and then waits 5-15 ms for the hypervisor (`perf
sched timehist`, docs/benchmarks.md, session 25): one stalled token in a few hundred streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence

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
        direct: bool = False,
    ) -> None:
        """`direct`: `send_from_thread` may write on the caller's thread (the writer keeps a second
        handle on the socket for that); without it, that call queues for the loop."""
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
        # Writes from another thread (`send_from_thread`): a private handle on the socket (a dup,
        # so it can never name another socket after the transport closes its own), the lock that
        # every queue change and write takes, and what the socket did not take of such a write
        # (the loop writes it before anything else).
        self._lock = threading.Lock()
        self._rest = b""
        self._loop = asyncio.get_running_loop()
        self._direct = _dup_socket(writer) if direct else None
        self._task = asyncio.create_task(self._run(), name="frame-writer")

    def send(self, frame: Frame | bytes) -> None:
        """Queue a frame (or an already encoded one, from `encode_frame`)."""
        if self._closed:
            return
        with self._lock:
            self._queue(frame)
        self._wake.set()

    def send_now(self, data: bytes, *, notice: bool = False) -> None:
        """Write an encoded frame (from `encode_frame`) at once if nothing is queued, the socket took
        all that was written before (so frames keep their order) and no frame went at once since the
        writer task's last turn; otherwise queue it. A `notice` written at once does not count: the
        request it announces sends its Open in the same turn, and that Open should go at once too."""
        if self._closed:
            return
        with self._lock:
            busy = self._wrote_now or self._pending or self._rest
            if busy or self._writer.transport.get_write_buffer_size():
                self._queue(data)
                queued = True
            else:
                queued = False
                try:
                    self._writer.write(data)
                except Exception as e:  # the connection is gone
                    error: BaseException | None = e
                else:
                    error = None
        if queued:
            self._wake.set()
            return
        if error is not None:
            self._fail(error)
            return
        self.num_writes += 1
        self.num_frames += 1
        if not notice:
            self._wrote_now = True  # until the writer task's next turn: a burst leaves in one write
            self._wake.set()

    def send_from_thread(self, frames: list[Frame]) -> None:
        """From a thread other than the loop's: write `frames` now if nothing is queued or unsent
        before them (so frames keep their order); otherwise queue them (merged like `send`'s) and
        wake the writer task. What the socket does not take at once is written first by the loop."""
        with self._lock:
            if self._closed or not frames:
                return
            sock = self._direct
            if sock is not None and not self._pending and not self._rest:
                if not self._writer.transport.get_write_buffer_size():
                    data = self._encode(frames)
                    try:
                        sent = sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:  # the connection is gone: the writer task finds out and says so
                        sent = 0
                    if sent:
                        self.num_writes += 1
                        self.num_frames += len(frames)
                        if sent < len(data):
                            self._rest = data[sent:]
                            self._loop.call_soon_threadsafe(self._flush_rest)
                        return
            for frame in frames:
                self._queue(frame)
        self._loop.call_soon_threadsafe(self._wake.set)

    async def close(self) -> None:
        """Flush what is queued (briefly), then close the socket."""
        if not self._closed:
            with self._lock:
                self._closed = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
        self._close_socket()

    def abort(self) -> None:
        """Close now, dropping anything queued."""
        with self._lock:
            self._closed = True
        self._task.cancel()
        self._close_socket()

    def _close_socket(self) -> None:
        with self._lock:
            self._closed = True
            self._rest = b""
            if self._direct is not None:
                self._direct.close()
                self._direct = None
        self._writer.close()

    def _queue(self, frame: Frame | bytes) -> None:
        """Append a frame to the queue, or merge a Tokens frame into its stream's queued one (the
        caller holds the lock)."""
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

    def _flush_rest(self) -> None:
        """Write what a direct write left unsent (unless the writer task already did)."""
        try:
            with self._lock:
                if self._rest and not self._closed:
                    rest, self._rest = self._rest, b""
                    self._writer.write(rest)
        except Exception as e:
            self._fail(e)

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._wrote_now = False
                # Taken, encoded and written under the lock: a direct write from another thread
                # may not overtake frames that were queued before it.
                with self._lock:
                    frames, self._pending = self._pending, []
                    self._open_tokens.clear()
                    if frames:
                        data = self._encode(frames)
                        if self._rest:
                            data, self._rest = self._rest + data, b""
                        self._writer.write(data)
                if frames:
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
        with self._lock:
            self._rest = b""
        if not self._failed:
            self._failed = self._closed = True
            if self._on_error is not None:
                self._on_error(e)

    def _encode(self, frames: Sequence[Frame | bytes]) -> bytes:
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


def _dup_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    """A second, non-blocking handle on the writer's TCP or Unix socket (None: no socket to share)."""
    raw = writer.get_extra_info("socket")
    if raw is None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except OSError:
        return None
    sock.setblocking(False)
    return sock
