"""MicrobatchEncoder: tokenizations that arrive together, gathered into one batch call.

    ids = await encoder.encode(texts, add_special_tokens)

Why: a closed loop's clients send their next requests in bursts (a batch that finished together),
and the engine prefills in one step only the prompts that have reached it when its step begins.
Encoded one by one as they land, a burst's prompts reached the engine spread over several ms; the
first ones started a prefill step and the rest waited a whole step behind them, so every turnover
split the batch again. Gathered, at c=64 with least-loaded routing: TTFT p50 117 -> 97 ms
(docs/benchmarks.md, sessions 7 and 8). Since then routers pick the worker as a request arrives and
an idle engine holds its prompts for the rest of a turnover (`tandem.engine.regroup`); the gather's
wait (7 ms p50 at c=64, traced) then cost more than it saved, so by default only prompts over 4,096
characters are gathered (`ModelTokenizer._batched`, session 18), and those run on a thread anyway.

So a call does not run at once. The encoder lets the event loop take in everything that is already
readable (one more turn of the loop), then encodes all waiting texts in one Rust batch call:
- on the event loop, when the batch holds at most `inline_chars` characters and no text longer than
  `inline_text_chars` (the Rust call spreads many texts over the cores, but one long text runs on one
  core; the hop to a thread and back costs a wake-up and two GIL hand-overs, several ms under load
  on a small machine);
- on the executor otherwise, the GIL released, so a burst of long prompts does not stop the
  streams. At most `max_batches` batches are on threads at once; texts that arrive meanwhile wait
  for the next free one and go together (as vLLM's `AsyncMicrobatchTokenizer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

EncodeMany = Callable[[list[str], bool], list[list[int]]]
"""(texts, add_special_tokens) -> each text's ids; must be safe to run on another thread."""

_Item = tuple[list[str], "asyncio.Future[list[list[int]]]"]
_Batches = list[tuple[bool, list[_Item]]]


class MicrobatchEncoder:
    def __init__(
        self,
        encode_many: EncodeMany,
        executor: Executor,
        max_batches: int = 1,
        inline_chars: int = 0,
        inline_text_chars: int = 0,
    ) -> None:
        """`max_batches`: batches on threads at once; a batch of at most `inline_chars` characters,
        none of its texts longer than `inline_text_chars`, is encoded on the event loop instead."""
        self._encode_many = encode_many
        self._executor = executor
        self._max_batches = max_batches
        self._inline_chars = inline_chars
        self._inline_text_chars = inline_text_chars
        self._pending: dict[bool, list[_Item]] = {}
        self._pending_chars = 0
        self._pending_longest = 0
        self._scheduled = False
        self._running = 0

    async def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[int]]] = loop.create_future()
        self._pending.setdefault(add_special_tokens, []).append((texts, future))
        self._pending_chars += sum(map(len, texts))
        self._pending_longest = max(self._pending_longest, max(map(len, texts), default=0))
        if not self._scheduled:
            # Two hops: a callback queued now runs in this same turn of the loop, before the loop
            # has read the other requests of a burst; one queued from there runs after that read.
            self._scheduled = True
            loop.call_soon(loop.call_soon, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        if not self._pending:
            return
        if self._pending_chars <= self._inline_chars and self._pending_longest <= self._inline_text_chars:
            batches = self._take()
            try:
                outcome: list[list[list[int]]] | BaseException = self._run(batches)
            except Exception as e:
                outcome = e
            self._deliver(batches, outcome)
        elif self._running < self._max_batches:
            batches = self._take()
            self._running += 1
            job = loop.run_in_executor(self._executor, self._run, batches)
            job.add_done_callback(lambda j: self._finish(loop, batches, j))
        # else: a thread batch ends soon and flushes what waits (`_finish`)

    def _take(self) -> _Batches:
        batches = list(self._pending.items())
        self._pending = {}
        self._pending_chars = 0
        self._pending_longest = 0
        return batches

    def _run(self, batches: _Batches) -> list[list[list[int]]]:
        """One call per special-token rule, every waiting text in it (on the loop or a thread)."""
        return [self._encode_many([t for texts, _ in items for t in texts], flag) for flag, items in batches]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batches: _Batches,
        job: asyncio.Future[list[list[list[int]]]],
    ) -> None:
        self._running -= 1
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        self._deliver(batches, job.result() if error is None else error)
        if not self._scheduled:
            self._flush(loop)  # what arrived while this batch ran

    @staticmethod
    def _deliver(batches: _Batches, outcome: list[list[list[int]]] | BaseException) -> None:
        """Each caller's slice of the batch's ids, or the batch's error."""
        for i, (_, items) in enumerate(batches):
            start = 0
            for texts, future in items:
                if not future.done():  # a caller that left (client disconnect) is skipped
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome[i][start : start + len(texts)])
                start += len(texts)
