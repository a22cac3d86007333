"""Request-plane server: serves calls from many multiplexed streams on persistent connections.

A `Handler` turns one `Call` into an async iterator of results, synchronously: whatever it does
before returning (a worker hands a request to its engine) happens as the frame is read, not one
event-loop turn later in the stream's task. It raises a `TandemError` to refuse the call.
`EngineOutput`s become `Tokens` frames (merged when the client lags), other results become `Reply`
frames; when the iterator ends the stream gets `End`, when it raises a `TandemError` the stream gets
`Fail` with the error's code. An `Open` with sid 0 is a notice: the handler is called for its effect
and nothing is sent back (its results, if any, are dropped; an error is logged).
A `Cancel` frame, or the connection closing, cancels the stream's task: the handler's `finally`
blocks run (a worker's handler aborts the engine request there, which frees its KV).

A handler may return a `Pushed` instead of an iterator: its results are pushed, not pulled. The
server hands it a `ResultSink` as the frame is read, and each result becomes a frame the moment it
is put there, on the loop's thread, with no task and no queue per stream. A worker's engine puts a
step's outputs for all its requests in one callback, so they leave in one write a loop turn later.
The stream ends at an output with a finish reason, or at an exception; a Cancel or the connection
closing calls `Pushed.close(finished=False)`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from tandem.control.framing import MAX_FRAME_BYTES, FrameError, FrameWriter, read_frame, set_nodelay
from tandem.protocol.errors import TandemError
from tandem.protocol.messages import EngineOutput
from tandem.protocol.rpc import Call, Cancel, End, Fail, Open, Ping, Pong, Reply, Tokens

log = logging.getLogger(__name__)


class Pushed(ABC):
    """A call's results, pushed (see the module docstring)."""

    __slots__ = ()  # one per request: let subclasses' slots take effect

    @abstractmethod
    def start(self, sink: ResultSink) -> None:
        """Start producing results into `sink` (called as the frame is read). Raise a `TandemError`
        to refuse the call."""

    @abstractmethod
    def close(self, *, finished: bool) -> None:
        """The stream is over: it ended (`finished`), or the client cancelled or left (stop the work)."""


Handler = Callable[[Call], "AsyncIterator[Any] | Pushed"]


class RpcServer:
    """Listens on host:port (port 0: the OS picks; read `port` after `start`)."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        client_timeout: float = 15.0,
        name: str = "rpc",
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.client_timeout = client_timeout
        """A client that sends nothing (not even its heartbeat pings) for this long is gone: its
        connection is closed and its calls cancelled, so a vanished host cannot pin KV blocks."""
        self.name = name
        self._server: asyncio.Server | None = None
        self._conns: set[_ServerConnection] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def num_streams(self) -> int:
        return sum(len(c.tasks) for c in self._conns)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s server listening on %s", self.name, self.address)

    async def stop_listening(self) -> None:
        """Refuse new connections; existing ones keep serving."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and close every connection (their streams are cancelled)."""
        await self.stop_listening()
        for conn in list(self._conns):
            await conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        set_nodelay(writer)
        conn = _ServerConnection(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.serve()
        finally:
            self._conns.discard(conn)


class _ServerConnection:
    def __init__(self, server: RpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.peer = writer.get_extra_info("peername")
        self.out = FrameWriter(writer, max_frame_bytes=server.max_frame_bytes, on_error=self._on_write_error)
        self.tasks: dict[int, asyncio.Task[None] | ResultSink] = {}
        """Live streams by sid: a task that pulls an iterator's results, or a pushed stream's sink."""
        self._last_rx = 0.0
        self._silent = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        serving = asyncio.current_task()
        self._watchdog = loop.call_later(self.server.client_timeout, self._watch, loop, serving)
        try:
            while True:
                # No timeout around each read (asyncio.wait_for would start a task per frame): the
                # watchdog closes a connection that stays silent instead.
                frame = await read_frame(self.reader, self.server.max_frame_bytes)
                self._last_rx = loop.time()
                if isinstance(frame, Open):
                    self._open(frame)
                elif isinstance(frame, Cancel):
                    task = self.tasks.pop(frame.sid, None)
                    if task is not None:
                        task.cancel()
                elif isinstance(frame, Ping):
                    self.out.send(Pong(frame.nonce))
                else:
                    raise FrameError(f"unexpected {type(frame).__name__} frame from a client")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, FrameError):
                log.warning("%s: closing connection from %s: %s", self.server.name, self.peer, e)
                self.out.send(Fail(0, "invalid_request_error", str(e)))
        except asyncio.CancelledError:
            if self._silent:
                log.warning(
                    "%s: client %s silent for %.0f s: closing",
                    self.server.name,
                    self.peer,
                    self.server.client_timeout,
                )
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self.close()

    def _watch(self, loop: asyncio.AbstractEventLoop, serving: asyncio.Task[Any] | None) -> None:
        """Cancel `serving` (the read loop) once the client has sent nothing for client_timeout."""
        idle = loop.time() - self._last_rx
        if idle >= self.server.client_timeout and serving is not None:
            self._silent = True
            serving.cancel()
            return
        self._watchdog = loop.call_later(self.server.client_timeout - idle, self._watch, loop, serving)

    def _open(self, frame: Open) -> None:
        if frame.sid == 0:
            self._notice(frame)
            return
        if frame.sid in self.tasks:
            self.out.send(Fail(frame.sid, "invalid_request_error", "stream id already in use"))
            return
        try:
            items = self.server.handler(frame.call)
        except TandemError as e:
            self.out.send(Fail(frame.sid, e.code, str(e)))
            return
        except Exception as e:
            log.exception("%s: call %s failed", self.server.name, type(frame.call).__name__)
            self.out.send(Fail(frame.sid, "internal_error", f"{type(e).__name__}: {e}"))
            return
        if isinstance(items, Pushed):
            self._push(frame.sid, items)
            return
        task = asyncio.create_task(self._run_call(frame.sid, items))
        # A task cancelled before its first step never enters `_run_call`: close its items here.
        task.add_done_callback(lambda t: _close_soon(items) if t.cancelled() else None)
        self.tasks[frame.sid] = task

    def _push(self, sid: int, pushed: Pushed) -> None:
        sink = ResultSink(self, sid, pushed)
        self.tasks[sid] = sink
        try:
            pushed.start(sink)
        except Exception as e:
            sink.put_nowait(e)

    def _notice(self, frame: Open) -> None:
        try:
            items = self.server.handler(frame.call)
        except Exception as e:  # nobody waits for an answer: say it here
            log.warning("%s: notice %s failed: %s", self.server.name, type(frame.call).__name__, e)
            return
        if isinstance(items, Pushed):
            items.close(finished=False)
        elif hasattr(items, "aclose"):
            _close_soon(items)

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        self.tasks.clear()
        await self.out.close()

    def _on_write_error(self, e: BaseException) -> None:
        log.info("%s: connection from %s lost on write: %s", self.server.name, self.peer, e)
        for task in list(self.tasks.values()):
            task.cancel()

    async def _run_call(self, sid: int, items: AsyncIterator[Any]) -> None:
        out = self.out
        try:
            try:
                async for item in items:
                    if isinstance(item, EngineOutput):
                        out.send(Tokens(sid, item))
                    else:
                        out.send(Reply(sid, item))
            finally:
                await _aclose(items)
            out.send(End(sid))
        except TandemError as e:
            out.send(Fail(sid, e.code, str(e)))
        except asyncio.CancelledError:
            pass  # the client cancelled or left: it expects nothing more on this stream
        except Exception as e:
            log.exception("%s: a call's stream failed", self.server.name)
            out.send(Fail(sid, "internal_error", f"{type(e).__name__}: {e}"))
        finally:
            self.tasks.pop(sid, None)


class ResultSink:
    """Where a `Pushed` puts its results: each becomes a frame on the stream at once (an
    `EngineOutput` a `Tokens` frame, any other result a `Reply`). An output with a finish reason
    ends the stream (`End` follows it); so does an exception (`Fail`). After the end, or once the
    client cancelled, results are dropped."""

    __slots__ = ("_conn", "_pushed", "_sid")

    def __init__(self, conn: _ServerConnection, sid: int, pushed: Pushed) -> None:
        self._conn = conn
        self._sid = sid
        self._pushed = pushed

    def put_nowait(self, item: Any) -> None:
        conn, sid = self._conn, self._sid
        if conn.tasks.get(sid) is not self:
            return
        out = conn.out
        if isinstance(item, EngineOutput):
            out.send(Tokens(sid, item))
            if item.finish_reason is None:
                return
            out.send(End(sid))
        elif isinstance(item, TandemError):
            out.send(Fail(sid, item.code, str(item)))
        elif isinstance(item, BaseException):
            log.error("%s: a pushed stream failed: %r", conn.server.name, item)
            out.send(Fail(sid, "internal_error", f"{type(item).__name__}: {item}"))
        else:
            out.send(Reply(sid, item))
            return
        del conn.tasks[sid]
        self._pushed.close(finished=True)

    def cancel(self) -> None:
        """The client cancelled the stream or left: stop the work; later results are dropped."""
        tasks = self._conn.tasks
        if tasks.get(self._sid) is self:
            del tasks[self._sid]
        self._pushed.close(finished=False)


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


_closing: set[asyncio.Future[None]] = set()


def _close_soon(items: AsyncIterator[Any]) -> None:
    job = asyncio.ensure_future(_aclose(items))
    _closing.add(job)  # the loop keeps only a weak reference to a task
    job.add_done_callback(_closing.discard)
