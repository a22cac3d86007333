"""TransferAgent: the thread where a worker's KV transfers run, beside its engine thread.

It owns an asyncio loop hosting this worker's `BlockServer` (peers read held blocks from here) and
its `BlockReader` (this worker reads peers' blocks). The engine thread only submits work and polls
results; the KV tensor is shared, and the blocks a transfer touches are never in use by a running
request (held blocks belong to finished requests; loaded blocks to requests still waiting), so the
two threads never write the same memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from tandem.transfer.client import BlockReader
from tandem.transfer.layout import KvLayout
from tandem.transfer.server import BlockServer

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransferAgent:
    def __init__(
        self,
        kv: torch.Tensor | None,
        layout: KvLayout,
        on_release: Callable[[str], None],
        *,
        host: str = "127.0.0.1",
        shm_path: str = "",
        prefer_shm: bool = True,
        hold_timeout_s: float = 120.0,
    ) -> None:
        self.layout = layout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-transfer", daemon=True)
        self._thread.start()
        self.server = BlockServer(kv, layout, on_release, shm_path=shm_path, hold_timeout_s=hold_timeout_s)
        self.reader = BlockReader(kv, layout, prefer_shm=prefer_shm)
        self.address: str = self.submit(self.server.start(host)).result(timeout=10)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.call(self.reader.close)
        try:
            self.submit(self.server.stop()).result(timeout=5)
        except Exception:  # the loop may already be gone at interpreter exit
            log.debug("transfer server stop failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
