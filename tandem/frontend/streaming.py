"""Runs one generation against the backend and writes it to the client, streaming or not.

Contracts:
- Errors raised before the first engine output (overloaded, model gone, prompt refused by the
  worker) become a plain HTTP error with the error's status; the SSE stream starts only once the
  first output is in, so its status line is always honest.
- An error after that (e.g. WorkerLostError) is sent as an SSE error event followed by [DONE], and
  the response ends: the client never hangs.
- The backend iterator is always closed when the response ends for any reason. A task watches the
  ASGI receive channel for `http.disconnect` and cancels the generation at once, even while it waits
  for the engine, so a vanished client frees its KV blocks on the worker within one event-loop turn.
- One SSE event per token, one `send` per engine output (an output holding several tokens, merged
  by a lagging request plane, becomes several events in one write; the last send also carries the
  usage chunk and [DONE]).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tandem.frontend.detokenize import TextStream
from tandem.frontend.errors import error_bytes, error_object
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.preprocess import ModelTokenizer, Prepared
from tandem.frontend.sse import DONE, ChunkWriter, error_event
from tandem.frontend.timing import RequestTiming
from tandem.protocol.errors import TandemError
from tandem.protocol.messages import EngineOutput
from tandem.protocol.openai import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionResponse,
    ChatLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ErrorResponse,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]
CLIENT_CLOSED = 499


@dataclass(slots=True)
class Generation:
    """Everything one request's response needs, fixed before the backend is called."""

    chat: bool
    endpoint: str
    response_id: str
    created: int
    model: str
    prepared: Prepared
    tok: ModelTokenizer
    outputs: AsyncIterator[EngineOutput]
    stream: bool
    include_usage: bool
    metrics: FrontendMetrics
    started: float
    """`time.perf_counter()` when the HTTP request arrived."""
    release: Callable[[], None] | None = None
    """Called once the response has ended: drops the router's early pick if `outputs` never ran."""
    timing: RequestTiming | None = None
    """Set when the client asked for `nvext` timing (`tandem.frontend.timing`)."""


class GenerationResponse(Response):
    """An ASGI response that drives a Generation and cancels it when the client goes away."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.status = CLIENT_CLOSED
        self.num_tokens = 0
        self.num_cached = 0
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gen = self.gen
        gen.metrics.request_started()
        # The generation runs in this (the request's) task, not a task of its own: a new task
        # would start one event-loop turn later, and under load a turn takes milliseconds, all
        # of them added to every request's time to first token.
        task = asyncio.current_task()
        assert task is not None
        running = True

        def client_left(watcher: asyncio.Future[None]) -> None:
            if running and not watcher.cancelled():
                task.cancel()

        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(client_left)
        if gen.timing is not None:
            gen.timing.dispatched = time.perf_counter()  # the backend sends it on the first read
        try:
            await (self._stream(send) if gen.stream else self._collect(send))
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # the server is shutting down, not a client disconnect
            task.uncancel()
            log.info("%s: client disconnected; generation cancelled", gen.response_id)
        finally:
            running = False
            watcher.cancel()
            await _close(gen.outputs)
            if gen.release is not None:
                gen.release()
            gen.metrics.request_ended()
            gen.metrics.count_request(gen.endpoint, self.status)
            p = gen.prepared
            gen.metrics.count_tokens(len(p.prompt_ids), self.num_tokens, self.num_cached)
            gen.metrics.e2e.observe(time.perf_counter() - gen.started)

    async def _stream(self, send: Send) -> None:
        gen = self.gen
        outputs = gen.outputs
        # The status waits for the first output: a worker's acceptance (`acceptance`: it has the
        # request, its prefill runs), or a first token from a backend that sends none. A request no
        # worker takes still gets its own 4xx/5xx.
        try:
            out = await anext(outputs)
        except (Exception, StopAsyncIteration) as e:
            await self._send_error(send, _as_tandem(e, gen.response_id))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self.status = 200
        writer = ChunkWriter(chat=gen.chat, request_id=gen.response_id, created=gen.created, model=gen.model)
        text = TextStream(gen.tok.tokenizer, gen.prepared.stop, gen.prepared.sampling.min_tokens)
        logprobs = _LogprobWriter(gen) if gen.prepared.logprobs else None
        ttft, itl = gen.metrics.ttft, gen.metrics.itl
        last = 0.0
        first = True
        try:
            while True:
                ids = out.new_token_ids
                n = len(ids)
                if not n and out.is_acceptance:  # (a second one can follow a retry elsewhere)
                    out = await anext(outputs)
                    continue
                if n:
                    now = time.perf_counter()
                    if last:
                        itl.observe((now - last) / n, n)
                    else:
                        ttft.observe(now - gen.started)
                        if gen.timing is not None:
                            gen.timing.first_token(now, out.engine_ttft_s)
                    last = now
                if n <= 1:
                    lps = out.new_logprobs
                    data, finish = _event(writer, text, logprobs, ids, lps, out.finish_reason, first)
                else:
                    # Several tokens in one output (the request plane merged steps for a lagging
                    # stream): still one SSE event per token, as clients and benchmarks expect,
                    # but written with one send.
                    events: list[bytes] = []
                    lps = out.new_logprobs
                    for i in range(n):
                        event, finish = _event(
                            writer,
                            text,
                            logprobs,
                            ids[i : i + 1],
                            lps[i : i + 1] if lps is not None else None,
                            out.finish_reason if i == n - 1 else None,
                            first,
                        )
                        first = False
                        events.append(event)
                        if finish is not None:
                            break
                    data = b"".join(events)
                first = False
                self.num_tokens = text.num_tokens
                self.num_cached = out.num_cached_tokens
                if finish is not None:
                    if gen.timing is not None:
                        data = writer.with_nvext(data, gen.timing.nvext_bytes(time.perf_counter()))
                    if gen.include_usage:
                        data += writer.usage(self._usage())
                    await send({"type": "http.response.body", "body": data + DONE, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": data, "more_body": True})
                out = await anext(outputs)
        except (Exception, StopAsyncIteration) as e:
            err = _as_tandem(e, gen.response_id)
            self.status = err.http_status
            log.warning("%s: stream failed after %d tokens: %s", gen.response_id, self.num_tokens, err)
            body = error_event(_encode(ErrorResponse(error=error_object(err))))
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _collect(self, send: Send) -> None:
        gen = self.gen
        text = TextStream(gen.tok.tokenizer, gen.prepared.stop, gen.prepared.sampling.min_tokens)
        logprobs = _LogprobWriter(gen) if gen.prepared.logprobs else None
        pieces: list[str] = []
        finish: str | None = None
        last = 0.0
        try:
            async for out in gen.outputs:
                ids = out.new_token_ids
                if out.is_acceptance:
                    continue
                if ids:
                    now = time.perf_counter()
                    if last:
                        gen.metrics.itl.observe((now - last) / len(ids), len(ids))
                    else:
                        gen.metrics.ttft.observe(now - gen.started)
                        if gen.timing is not None:
                            gen.timing.first_token(now, out.engine_ttft_s)
                    last = now
                delta, stopped = text.push(ids)
                pieces.append(delta)
                if logprobs is not None:
                    logprobs.add(ids, out.new_logprobs)
                self.num_tokens = text.num_tokens
                self.num_cached = out.num_cached_tokens
                if stopped:
                    finish = "stop"
                    break
                if out.finish_reason is not None:
                    finish = out.finish_reason
                    pieces.append(text.finish())
                    break
            if finish is None:
                raise StopAsyncIteration
        except (Exception, StopAsyncIteration) as e:
            await self._send_error(send, _as_tandem(e, gen.response_id))
            return
        body = self._response_body("".join(pieces), finish, logprobs)
        self.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _usage(self) -> Usage:
        n_prompt = len(self.gen.prepared.prompt_ids)
        return Usage(
            prompt_tokens=n_prompt,
            completion_tokens=self.num_tokens,
            total_tokens=n_prompt + self.num_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached),
        )

    def _response_body(self, text: str, finish: str, logprobs: _LogprobWriter | None) -> bytes:
        gen = self.gen
        nvext = gen.timing.nvext(time.perf_counter()) if gen.timing is not None else msgspec.UNSET
        if gen.chat:
            chat = ChatChoice(
                index=0,
                message=ResponseMessage(role="assistant", content=text),
                finish_reason=finish,
                logprobs=ChatChoiceLogprobs(logprobs.chat) if logprobs is not None else None,
            )
            return _encode(
                ChatCompletionResponse(
                    gen.response_id, gen.created, gen.model, [chat], self._usage(), nvext=nvext
                )
            )
        choice = CompletionChoice(
            index=0, text=text, finish_reason=finish, logprobs=logprobs.completion() if logprobs else None
        )
        return _encode(
            CompletionResponse(gen.response_id, gen.created, gen.model, [choice], self._usage(), nvext=nvext)
        )

    async def _send_error(self, send: Send, err: TandemError) -> None:
        self.status = err.http_status
        headers = list(_JSON_HEADERS)
        if err.http_status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": error_bytes(err), "more_body": False})


class _LogprobWriter:
    """Chosen-token logprobs in the chat or completions shape (top alternatives are not reported)."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.chat: list[ChatLogprob] = []
        self.tokens: list[str] = []
        self.values: list[float] = []
        self.offsets: list[int] = []
        self._offset = 0

    def add(self, ids: list[int], values: list[float] | None) -> None:
        vals = values if values is not None and len(values) == len(ids) else [0.0] * len(ids)
        for token_id, value in zip(ids, vals, strict=True):
            token = self.gen.tok.token_text(token_id)
            if self.gen.chat:
                self.chat.append(ChatLogprob(token, value, list(token.encode()), []))
            else:
                self.tokens.append(token)
                self.values.append(value)
                self.offsets.append(self._offset)
                self._offset += len(token)

    def completion(self) -> CompletionLogprobs:
        top = [{t: v} for t, v in zip(self.tokens, self.values, strict=True)]
        return CompletionLogprobs(self.tokens, self.values, top, self.offsets)

    def stream_bytes(self, ids: list[int], values: list[float] | None) -> bytes:
        n_before = len(self.chat) if self.gen.chat else len(self.values)
        self.add(ids, values)
        if self.gen.chat:
            return _encode(ChatChoiceLogprobs(self.chat[n_before:]))
        top = [{t: v} for t, v in zip(self.tokens[n_before:], self.values[n_before:], strict=True)]
        return _encode(
            CompletionLogprobs(self.tokens[n_before:], self.values[n_before:], top, self.offsets[n_before:])
        )


def _event(
    writer: ChunkWriter,
    text: TextStream,
    logprobs: _LogprobWriter | None,
    ids: list[int],
    values: list[float] | None,
    engine_finish: str | None,
    first: bool,
) -> tuple[bytes, str | None]:
    """One SSE event for `ids` (usually one token) and the finish reason it carries, if any."""
    delta, stopped = text.push(ids)
    finish = "stop" if stopped else engine_finish
    if finish is not None and not stopped:
        delta += text.finish()
    lp = logprobs.stream_bytes(ids, values) if logprobs is not None else b"null"
    return writer.chunk(delta, finish, first=first, logprobs=lp), finish


def _as_tandem(e: BaseException, response_id: str) -> TandemError:
    """User-visible errors pass through; anything else is a 500 that does not leak internals."""
    if isinstance(e, TandemError):
        return e
    if isinstance(e, StopAsyncIteration):
        return TandemError("the backend ended the stream without a finish reason")
    log.error("%s: backend failed", response_id, exc_info=e)
    return TandemError(f"internal error: {type(e).__name__}")


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: dict[str, Any] = dict(await receive())
        if message["type"] == "http.disconnect":
            return


async def _close(outputs: AsyncIterator[EngineOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # closing is best effort; the request already has its answer
        log.exception("closing the backend stream failed")
