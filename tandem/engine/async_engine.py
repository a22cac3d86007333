"""AsyncEngine: an EngineCore driven by its own thread, served to asyncio code as token streams.

The core is single-threaded; this class is the one place where threads meet it. Requests and aborts
enter through a queue that the engine thread drains before each step; outputs go back to each
request's sink with `loop.call_soon_threadsafe`, batched once per event loop per step. A sink is an
asyncio queue behind an `EngineStream` (`submit`), or, with `push`, any object whose `put_nowait` the
loop thread calls with each output (a worker's request-plane stream writes it out as a frame there,
with no queue and no task per request). When idle, the engine thread blocks on the inbox, so an idle
worker burns no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tandem.engine.core import EngineCore, EngineStats
from tandem.engine.request import SamplingParams
from tandem.protocol.errors import InvalidRequestError, TandemError
from tandem.protocol.messages import EngineOutput, GenerateRequest, SamplingSpec, acceptance

log = logging.getLogger(__name__)

TRANSFER_POLL_S = 0.002
STATS_INTERVAL_S = 0.01
"""How stale `AsyncEngine.stats`' counters may be while the engine is busy: building the snapshot
every step took half of a busy simulated worker's CPU (session 20). It is rebuilt at once when a
request starts running, ends or waits, and when the engine runs out of work."""

T = TypeVar("T")


def sampling_from_spec(spec: SamplingSpec) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            seed=spec.seed,
            stop_token_ids=tuple(spec.stop_token_ids),
            ignore_eos=spec.ignore_eos,
            logprobs=spec.logprobs,
            min_tokens=spec.min_tokens,
        )
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e


class OutputSink(Protocol):
    """Where one request's outputs go, on its event loop's thread: each `EngineOutput` in order,
    the last with a finish reason, or one exception (the engine refused or dropped the request)."""

    def put_nowait(self, item: EngineOutput | BaseException) -> None: ...


@dataclass
class _Add:
    req: GenerateRequest
    sink: OutputSink
    loop: asyncio.AbstractEventLoop
    arrival: float
    """When it was handed over (`EngineCore.clock`): the engine thread takes it in between steps,
    and the wait for the step under way is the engine's queue time too."""
    accept: bool = False
    """Stream an `acceptance` output once the engine has taken the request in."""


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Expect:
    request_id: str
    at: float
    """When the announcement came (`EngineCore.clock`), like `_Add.arrival`."""


@dataclass
class _Call:
    """Run `fn(core)` on the engine thread between steps (the core is not thread-safe)."""

    fn: Callable[[EngineCore], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, core: EngineCore, name: str = "engine") -> None:
        self.core = core
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Expect | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._accepted: list[_Add] = []
        self._stats = core.stats()
        self._stats_due = 0.0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def stats(self) -> EngineStats:
        """Engine counters as of a recent step (see `STATS_INTERVAL_S`; read without locking)."""
        return self._stats

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def submit(self, req: GenerateRequest, *, accept: bool = False) -> EngineStream:
        """Hand `req` to the engine now (it joins the next step) and return its output stream.

        `accept`: the stream's first output is an `acceptance`, sent as the engine thread takes the
        request in and starts its step (so the loop thread does that work while the step runs, not
        while the engine thread waits for the GIL to start it)."""
        sink: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        self.push(req, sink, accept=accept)
        return EngineStream(self, req.request_id, sink)

    def push(self, req: GenerateRequest, sink: OutputSink, *, accept: bool = False) -> None:
        """Hand `req` to the engine now; its outputs go to `sink.put_nowait` on this event loop's
        thread, a step's outputs for every request in one callback. `abort(request_id)` stops it."""
        if self._stopped:
            raise TandemError("the engine is stopped")
        self._inbox.put(_Add(req, sink, asyncio.get_running_loop(), self.core.clock(), accept))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs for one request. Closing the iterator early aborts it and frees its KV."""
        stream = self.submit(req)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    @property
    def takes_announcements(self) -> bool:
        """The scheduler waits for announced requests (`expect`); off by default."""
        return self.core.scheduler.regroup.takes_announcements

    def expect(self, request_id: str) -> None:
        """A router has picked this engine for `request_id`, which will be submitted soon. Dropped
        here when the scheduler ignores announcements (the default): no engine-thread wake-up."""
        if self.takes_announcements:
            self._inbox.put(_Expect(request_id, self.core.clock()))

    async def run_on_engine(self, fn: Callable[[EngineCore], T]) -> T:
        """`fn(core)` run on the engine thread between two steps (e.g. a consistent KV dump)."""
        if self._stopped:
            raise TandemError("the engine is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(_Call(fn, future, loop))
        return await future

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        core = self.core
        while True:
            # Block on the inbox when idle; poll every few ms while only transfers are in flight;
            # wake when the scheduler lets held prompts start (or at the next arrival).
            timeout: float | None = None
            block = not core.has_runnable() or core.last_step_idle
            if block and (core.has_pending_transfers() or core.last_step_idle):
                timeout = TRANSFER_POLL_S
                held = core.seconds_held() if core.last_step_idle else None
                if held is not None:
                    timeout = min(timeout, held) if core.has_pending_transfers() else held
            try:
                while True:
                    msg = self._inbox.get(block=block, timeout=timeout)
                    block = False
                    if msg is None:
                        self._fail_all(TandemError("the engine stopped"))
                        return
                    self._handle(msg)
            except queue.Empty:
                pass
            if self._accepted:
                self._send_acceptances()
            if not core.has_unfinished():
                continue
            try:
                outputs = core.step()
            except Exception as e:  # an executor bug must not leave clients hanging
                log.exception("engine step failed")
                self._fail_all(TandemError(f"engine step failed: {e}"))
                continue
            now = time.monotonic()
            if now >= self._stats_due or core.running_set_changed(self._stats) or not core.has_unfinished():
                self._stats, self._stats_due = core.stats(), now + STATS_INTERVAL_S
            self._deliver(outputs)

    def _handle(self, msg: _Add | _Abort | _Expect | _Call) -> None:
        if isinstance(msg, _Abort):
            self.core.abort(msg.request_id)
            return
        if isinstance(msg, _Expect):
            self.core.scheduler.expect(msg.request_id, msg.at)
            return
        if isinstance(msg, _Call):
            try:
                result = msg.fn(self.core)
            except Exception as e:
                msg.loop.call_soon_threadsafe(_set_exception, msg.future, e)
            else:
                msg.loop.call_soon_threadsafe(_set_result, msg.future, result)
            return
        req = msg.req
        try:
            self.core.add_request(
                req.prompt_token_ids,
                sampling_from_spec(req.sampling),
                request_id=req.request_id,
                kv_transfer_params=req.kv_transfer_params,
                output_token_ids=req.output_token_ids,
                arrival_time=msg.arrival,
            )
        except TandemError as e:
            msg.loop.call_soon_threadsafe(msg.sink.put_nowait, e)
            return
        self._streams[req.request_id] = msg
        if msg.accept:
            self._accepted.append(msg)

    def _send_acceptances(self) -> None:
        accepted, self._accepted = self._accepted, []
        _send([(add, acceptance(add.req.request_id)) for add in accepted])

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        delivered: list[tuple[_Add, EngineOutput]] = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finish_reason is not None:
                del self._streams[out.request_id]
            delivered.append((stream, out))
        _send(delivered)

    def _fail_all(self, err: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.core.abort(rid)
            stream.loop.call_soon_threadsafe(stream.sink.put_nowait, err)
        self._streams.clear()


class EngineStream:
    """One request's outputs, in order, as an async iterator. Closing it before the last output
    aborts the request (its KV blocks are freed at the engine's next step)."""

    __slots__ = ("_engine", "_finished", "_request_id", "_sink")

    def __init__(
        self, engine: AsyncEngine, request_id: str, sink: asyncio.Queue[EngineOutput | BaseException]
    ) -> None:
        self._engine = engine
        self._request_id = request_id
        self._sink = sink
        self._finished = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._sink.get()
        if isinstance(item, BaseException):
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.abort(self._request_id)

    async def aclose(self) -> None:
        self.close()


def _send(outputs: list[tuple[_Add, EngineOutput]]) -> None:
    """Each output into its stream's sink: one `call_soon_threadsafe` per event loop per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputSink, EngineOutput]]] = {}
    for stream, out in outputs:
        by_loop.setdefault(stream.loop, []).append((stream.sink, out))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[OutputSink, EngineOutput]]) -> None:
    for sink, out in items:
        sink.put_nowait(out)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
