"""DisaggConnector: the engine's KV connector for prefill/decode disaggregation (both sides).

Prefill worker: a request sent with `kv_transfer_params={"do_remote_decode": True}` runs as usual
(the caller asks for one token). When it finishes, its prompt blocks are held (not freed) and its
last output carries the transfer parameters a decode worker needs:

    {"remote_address": "host:port", "remote_handle": str, "num_tokens": P, "block_size": B,
     "shm_path": str, "remote_worker": str}

Decode worker: a request carrying those parameters (and the first token as `output_token_ids`)
loads the prompt's P tokens of KV from the peer into freshly allocated blocks, in the background
(`WAITING_FOR_REMOTE_KV`), then decodes. Blocks it already has locally (a prefix hit) are not read.
When the load fails (peer died, timed out, incompatible) the engine computes the prompt itself.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tandem.engine.connector import ExternalMatch, FinishedTransfers, KVConnectorScheduler, KVConnectorWorker
from tandem.engine.request import Request, RequestStatus
from tandem.transfer.agent import TransferAgent
from tandem.transfer.layout import KvLayout
from tandem.transfer.shm import SharedKvCache, shm_available, shm_has_room

log = logging.getLogger(__name__)


@dataclass
class _Load:
    request_id: str
    address: str
    handle: str
    first_block: int
    dst_block_ids: list[int]
    shm_path: str
    src_block_ids: list[int] | None = None
    shm_shape: list[int] | None = None


class DisaggConnector(KVConnectorScheduler, KVConnectorWorker):
    def __init__(
        self,
        layout: KvLayout,
        *,
        worker_id: str = "",
        host: str = "127.0.0.1",
        use_shm: bool = True,
        hold_timeout_s: float = 120.0,
        load_timeout_s: float = 30.0,
    ) -> None:
        self.layout = layout
        self.worker_id = worker_id
        self.host = host
        self.use_shm = use_shm and shm_available()
        self.hold_timeout_s = hold_timeout_s
        self.load_timeout_s = load_timeout_s
        self.agent: TransferAgent | None = None
        self._shm: SharedKvCache | None = None
        self._lock = threading.Lock()
        self._released: set[str] = set()
        self._loaded: set[str] = set()
        self._failed: set[str] = set()
        self._local_tokens: dict[str, int] = {}
        self._pending: list[_Load] = []
        self._handles: dict[str, str] = {}
        self.num_loads = 0
        self.num_load_failures = 0
        self.load_seconds_total = 0.0
        """Wall time of finished loads, submit to done (connect, copy or receive, release)."""
        self.load_bytes_total = 0
        """KV bytes that finished loads wrote into this engine's cache."""

    # Executor side: where the KV lives.

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The engine's KV tensor; in shared memory when on CPU, so a same-host peer copies it once."""
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        if self.use_shm and device.type == "cpu":
            if shm_has_room(nbytes):
                self._shm = SharedKvCache(shape, dtype)
                return self._shm.tensor
            log.warning(
                "/dev/shm has no room for %d MiB of KV cache; peers will read it over TCP", nbytes >> 20
            )
        return torch.zeros(shape, dtype=dtype, device=device)

    def register_kv_caches(self, kv: torch.Tensor | None) -> None:
        """Start serving and reading blocks of `kv` (None: the simulated engine, hand-offs only)."""
        assert self.agent is None, "KV caches registered twice"
        self.agent = TransferAgent(
            kv,
            self.layout,
            self._on_release,
            host=self.host,
            shm_path=str(self._shm.path) if self._shm else "",
            prefer_shm=self.use_shm,
            hold_timeout_s=self.hold_timeout_s,
        )

    @property
    def address(self) -> str:
        return self.agent.address if self.agent else ""

    def close(self) -> None:
        if self.agent:
            self.agent.close()
        if self._shm:
            self._shm.close()

    # Scheduler side.

    def get_num_new_matched_tokens(self, request: Request, num_local_tokens: int) -> ExternalMatch:
        p = request.kv_transfer_params
        if not p or "remote_handle" not in p:
            return ExternalMatch()
        n = min(int(p["num_tokens"]), request.num_tokens - 1) - num_local_tokens
        if n <= 0:
            # Everything is cached here already: tell the peer to let go without reading.
            self._pending.append(
                _Load(request.request_id, p["remote_address"], p["remote_handle"], 1 << 30, [], "")
            )
            return ExternalMatch()
        self._local_tokens[request.request_id] = num_local_tokens
        return ExternalMatch(num_tokens=n, load_async=True)

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        p = request.kv_transfer_params
        assert p is not None
        local = self._local_tokens.pop(request.request_id, 0)
        bs = self.layout.block_size
        first = local // bs
        last = -(-(local + num_external_tokens) // bs)
        self._pending.append(
            _Load(
                request.request_id,
                p["remote_address"],
                p["remote_handle"],
                first,
                list(block_ids[first:last]),
                p.get("shm_path", ""),
                p.get("remote_block_ids"),
                p.get("shm_shape"),
            )
        )

    def build_meta(self) -> list[_Load]:
        loads, self._pending = self._pending, []
        return loads

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        p = request.kv_transfer_params
        # Only a prefill that stopped for length (the one token asked for) has a decode to come; one
        # that hit EOS or a stop id, or was aborted, is over and keeps nothing.
        if not p or not p.get("do_remote_decode") or request.status != RequestStatus.FINISHED_LENGTH:
            return False, None
        assert self.agent is not None, "register_kv_caches was not called"
        n_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        n_blocks = -(-n_tokens // self.layout.block_size)
        handle = f"{self.worker_id}/{request.request_id}"
        self._handles[handle] = request.request_id
        held = list(block_ids[:n_blocks])
        self.agent.call(self.agent.server.hold, handle, held)
        return True, {
            "remote_address": self.agent.address,
            "remote_handle": handle,
            "num_tokens": n_tokens,
            "block_size": self.layout.block_size,
            "shm_path": str(self._shm.path) if self._shm else "",
            "remote_worker": self.worker_id,
            # With these a same-host peer reads the blocks one-sidedly (no request/reply first).
            "remote_block_ids": held,
            "shm_shape": list(self._shm.shape) if self._shm else None,
        }

    # Worker side.

    def start_load_kv(self, meta: Any) -> None:
        for load in meta or ():
            assert self.agent is not None, "register_kv_caches was not called"
            fut = self.agent.submit(
                self.agent.reader.read(
                    load.address,
                    load.handle,
                    load.dst_block_ids,
                    first_block=load.first_block,
                    shm_path=load.shm_path,
                    src_block_ids=load.src_block_ids,
                    shm_shape=load.shm_shape,
                    timeout_s=self.load_timeout_s,
                )
            )
            if load.dst_block_ids:
                self.num_loads += 1
                # The simulated engine has no tensors: its loads are hand-offs of zero bytes.
                block_bytes = self.layout.layer_block_bytes * self.layout.num_layers
                nbytes = len(load.dst_block_ids) * block_bytes if self.agent.reader.kv is not None else 0
                fut.add_done_callback(
                    functools.partial(self._on_loaded, load.request_id, time.perf_counter(), nbytes)
                )

    def save_kv(self, meta: Any) -> None:
        """Nothing to push: peers pull held blocks when they are ready for them."""

    def get_finished(self) -> FinishedTransfers:
        with self._lock:
            done = FinishedTransfers(self._released, self._loaded, self._failed)
            self._released, self._loaded, self._failed = set(), set(), set()
        return done

    def _on_release(self, handle: str) -> None:
        rid = self._handles.pop(handle, None)
        if rid is not None:
            with self._lock:
                self._released.add(rid)

    def _on_loaded(self, request_id: str, started: float, nbytes: int, fut: Future) -> None:
        err = fut.exception()
        with self._lock:
            if err is None:
                self.load_seconds_total += time.perf_counter() - started
                self.load_bytes_total += nbytes
                self._loaded.add(request_id)
            else:
                self.num_load_failures += 1
                log.warning("KV load for %s failed: %s", request_id, err)
                self._failed.add(request_id)
