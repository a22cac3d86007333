"""Request-plane client: pooled persistent connections, many concurrent streams on each.

    pool = RpcClientPool()
    async with await pool.open("127.0.0.1:7001", GenerateCall(req)) as stream:
        async for output in stream:      # EngineOutput deltas, then StopAsyncIteration at End
            ...
    stats = await pool.call("127.0.0.1:7001", StatsCall())   # unary: the one Reply body

Promises: a stream either ends (End), raises the server's error (Fail -> the matching TandemError),
or raises WorkerLostError when the connection breaks: at EOF/reset at once, and when the peer stops
answering heartbeats within `heartbeat_timeout`. Leaving a stream early sends Cancel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from tandem.control.framing import (
    MAX_FRAME_BYTES,
    FrameError,
    FrameWriter,
    encode_frame,
    read_frame,
    set_nodelay,
)
from tandem.protocol import errors
from tandem.protocol.errors import InvalidRequestError, TandemError, WorkerLostError
from tandem.protocol.rpc import Call, Cancel, End, Fail, Open, Ping, Pong, Reply, Tokens

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[TandemError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, TandemError) and cls is not TandemError
}


def error_from_code(code: str, message: str) -> TandemError:
    """The user-visible error a Fail frame stands for (its class is chosen by `code`)."""
    return _ERRORS.get(code, TandemError)(message)


_END = object()


class RpcStream:
    """One call's results. Async-iterate it; `aclose()` (or leaving `async with`) cancels it."""

    def __init__(self, conn: RpcConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        item = await self._items.get()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    async def one(self) -> Any:
        """The first result of a unary call (then the stream is closed)."""
        try:
            async for item in self:
                return item
            raise TandemError("the call ended without a reply")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.conn._cancel(self.sid)

    async def __aenter__(self) -> RpcStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _put(self, item: Any) -> None:
        self._items.put_nowait(item)


class RpcConnection:
    """One TCP connection to a server, shared by many streams."""

    def __init__(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        max_frame_bytes: int,
    ) -> None:
        self.address = address
        self._reader = reader
        self._max = max_frame_bytes
        self._out = FrameWriter(writer, max_frame_bytes=max_frame_bytes, on_error=self._lost)
        self._streams: dict[int, RpcStream] = {}
        self._sids = itertools.count(1)
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self.closed = False
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"rpc-read-{address}")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name=f"rpc-ping-{address}")

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        connect_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> RpcConnection:
        """Raises WorkerLostError if the server cannot be reached within `connect_timeout`."""
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), connect_timeout)
        except (OSError, TimeoutError) as e:
            raise WorkerLostError(f"cannot connect to {address}: {e or 'timed out'}") from e
        set_nodelay(writer)
        return cls(
            address,
            reader,
            writer,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_frame_bytes=max_frame_bytes,
        )

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def open(self, call: Call) -> RpcStream:
        """Start a call. Raises WorkerLostError if the connection is closed, InvalidRequestError if
        the call does not fit in one frame."""
        if self.closed:
            raise WorkerLostError(f"connection to {self.address} is closed")
        sid = next(self._sids)
        try:
            data = encode_frame(Open(sid, call), self._max)
        except FrameError as e:
            raise InvalidRequestError(f"request too large: {e}") from e
        stream = RpcStream(self, sid)
        self._streams[sid] = stream
        self._out.send_now(data)
        return stream

    def notify(self, call: Call) -> None:
        """Send `call` as a notice (sid 0): the server acts on it and answers nothing."""
        if not self.closed:
            self._out.send_now(encode_frame(Open(0, call), self._max), notice=True)

    async def close(self) -> None:
        self._fail_all(WorkerLostError(f"connection to {self.address} was closed"))
        self._heartbeat_task.cancel()
        self._reader_task.cancel()
        await self._out.close()

    def _cancel(self, sid: int) -> None:
        if self._streams.pop(sid, None) is not None and not self.closed:
            self._out.send(Cancel(sid))

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader, self._max)
                self._last_rx = self._loop.time()
                if isinstance(frame, Tokens):
                    stream = self._streams.get(frame.sid)
                    if stream is not None:
                        stream._put(frame.output)
                elif isinstance(frame, Reply):
                    stream = self._streams.get(frame.sid)
                    if stream is not None:
                        stream._put(frame.body)
                elif isinstance(frame, End):
                    stream = self._streams.pop(frame.sid, None)
                    if stream is not None:
                        stream._put(_END)
                elif isinstance(frame, Fail):
                    if frame.sid == 0:
                        raise FrameError(f"server closed the connection: {frame.message}")
                    stream = self._streams.pop(frame.sid, None)
                    if stream is not None:
                        stream._put(error_from_code(frame.code, frame.message))
                elif not isinstance(frame, Pong):
                    raise FrameError(f"unexpected {type(frame).__name__} frame from a server")
        except asyncio.CancelledError:
            return
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            why = "closed the connection" if isinstance(e, asyncio.IncompleteReadError) else str(e)
            self._lost(WorkerLostError(f"{self.address} {why}"))
        except Exception as e:
            log.exception("request-plane client for %s failed", self.address)
            self._lost(e)

    async def _heartbeat(self) -> None:
        # EOF catches a dead process at once; silence catches a hung process or a lost host.
        for nonce in itertools.count():
            await asyncio.sleep(self._interval)
            silent = self._loop.time() - self._last_rx
            if silent > self._timeout:
                self._lost(WorkerLostError(f"{self.address} did not answer for {silent:.1f} s"))
                return
            self._out.send(Ping(nonce))

    def _lost(self, e: BaseException) -> None:
        if self.closed:
            return
        err = e if isinstance(e, WorkerLostError) else WorkerLostError(f"{self.address}: {e}")
        # An idle connection closing is routine (a worker stopped); losing live streams is not.
        level = logging.WARNING if self._streams else logging.INFO
        log.log(level, "lost connection to %s (%d streams): %s", self.address, len(self._streams), err)
        self._fail_all(err)
        self._heartbeat_task.cancel()
        self._out.abort()

    def _fail_all(self, err: TandemError) -> None:
        self.closed = True
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._put(err)


class RpcClientPool:
    """Up to `connections_per_address` connections per server, opened on demand and replaced when
    they break; a new stream goes to the connection with the fewest streams."""

    def __init__(
        self,
        *,
        connections_per_address: int = 1,
        connect_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        assert connections_per_address >= 1, "need at least one connection per address"
        self.per_address = connections_per_address
        self._opts = dict(
            connect_timeout=connect_timeout,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_frame_bytes=max_frame_bytes,
        )
        self._conns: dict[str, list[RpcConnection]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def connection(self, address: str) -> RpcConnection:
        live = [c for c in self._conns.get(address, []) if not c.closed]
        self._conns[address] = live
        if len(live) >= self.per_address:
            return min(live, key=lambda c: c.num_streams)
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:  # one connect at a time per address, so a burst does not open dozens
            live = [c for c in self._conns.get(address, []) if not c.closed]
            if len(live) < self.per_address:
                live.append(await RpcConnection.connect(address, **self._opts))  # type: ignore[arg-type]
                self._conns[address] = live
            return min(live, key=lambda c: c.num_streams)

    async def open(self, address: str, call: Call) -> RpcStream:
        return (await self.connection(address)).open(call)

    def notify(self, address: str, call: Call) -> bool:
        """Send a notice (`RpcConnection.notify`) on a live connection to `address`, without
        waiting: False (nothing sent) when there is none yet."""
        live = [c for c in self._conns.get(address, ()) if not c.closed]
        if not live:
            return False
        min(live, key=lambda c: c.num_streams).notify(call)
        return True

    async def call(self, address: str, call: Call) -> Any:
        """A unary call's reply body."""
        return await (await self.open(address, call)).one()

    async def drop(self, address: str) -> None:
        for conn in self._conns.pop(address, []):
            await conn.close()

    async def close(self) -> None:
        for address in list(self._conns):
            await self.drop(address)
