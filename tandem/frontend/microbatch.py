"""MicrobatchEncoder: concurrent tokenizations gathered into one batch call on a tokenizer thread.

    ids = await encoder.encode(texts, add_special_tokens)

Why: prompts are tokenized beside the frontend's event loop (see `ModelTokenizer._offload`), and a
closed loop's clients send their next requests in bursts. One thread hop per prompt costs a wake-up
and a GIL hand-back each; under load on a small machine that was ~5 ms of queueing per prompt at
c=64. Here at most one batch is on a thread at a time; prompts that arrive meanwhile wait for the
next, which encodes all of them in one Rust call (spread over the cores by the tokenizers library,
the GIL released). vLLM's `AsyncMicrobatchTokenizer` does the same for the same reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

EncodeMany = Callable[[list[str], bool], list[list[int]]]
"""(texts, add_special_tokens) -> each text's ids; must be safe to run on another thread."""

_Item = tuple[list[str], "asyncio.Future[list[list[int]]]"]


class MicrobatchEncoder:
    def __init__(self, encode_many: EncodeMany, executor: Executor) -> None:
        self._encode_many = encode_many
        self._executor = executor
        self._pending: dict[bool, list[_Item]] = {}
        self._running = False

    async def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[int]]] = loop.create_future()
        self._pending.setdefault(add_special_tokens, []).append((texts, future))
        if not self._running:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batches = list(self._pending.items())
        self._pending = {}
        if not batches:
            return
        self._running = True
        job = loop.run_in_executor(self._executor, self._run, batches)
        job.add_done_callback(lambda j: self._finish(loop, batches, j))

    def _run(self, batches: list[tuple[bool, list[_Item]]]) -> list[list[list[int]]]:
        """On the tokenizer thread: one call per special-token rule, every waiting text in it."""
        return [self._encode_many([t for texts, _ in items for t in texts], flag) for flag, items in batches]

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batches: list[tuple[bool, list[_Item]]],
        job: asyncio.Future[list[list[list[int]]]],
    ) -> None:
        self._running = False
        error = job.exception() if not job.cancelled() else asyncio.CancelledError()
        results = job.result() if error is None else [[] for _ in batches]
        for (_, items), ids in zip(batches, results, strict=True):
            start = 0
            for texts, future in items:
                if not future.done():  # a caller that left (client disconnect) is skipped
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(ids[start : start + len(texts)])
                start += len(texts)
        self._start(loop)  # what arrived while this batch ran
