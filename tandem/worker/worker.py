"""Worker: one engine served over the request plane, registered in discovery, drained on stop.

    Worker(config, discovery).start()  -> builds EngineCore + AsyncEngine, listens, registers
    generate call  -> AsyncEngine.push as the frame is read, then the stream: an `acceptance`
                      once the engine has taken it in, then its outputs, each written as a frame
                      as the engine hands it over (cancelling the stream aborts it)
    stats call     -> WorkerStats (engine counters + active requests)
    kv_events call -> this engine's KV events, a batch a step, until cancelled (KV-aware routers)
    kv_dump call   -> every cached block now (a router's bootstrap or resync after a gap)
    drain()        -> status "draining" in discovery (routers stop picking it), new generate calls
                      refused with OverloadedError, in-flight requests finish (bounded), deregister

Load (active requests, KV usage) is pushed to discovery at most every `load_interval` seconds and
only when it changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tandem.control.discovery import DEFAULT_TTL, Discovery, Lease
from tandem.control.rpc_server import Pushed, ResultSink, RpcServer
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore, EngineStats
from tandem.engine.executor import Executor
from tandem.engines.builtin.dtypes import compute_dtype
from tandem.engines.factory import build_executor
from tandem.protocol.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from tandem.protocol.messages import GenerateRequest
from tandem.protocol.registry import Hardware, Role, WorkerInfo, WorkerLoad, WorkerStats
from tandem.protocol.rpc import (
    Call,
    ExpectCall,
    GenerateCall,
    KvDumpCall,
    KvDumpReply,
    KvEventBatch,
    KvEventsCall,
    StatsCall,
)
from tandem.transfer.connector import DisaggConnector
from tandem.transfer.layout import layout_from_config
from tandem.worker.publisher import KvEventPublisher

log = logging.getLogger(__name__)

_ENGINE_COUNTERS = tuple(f.name for f in fields(EngineStats) if f.name in WorkerStats.__struct_fields__)
"""The engine's counters a `stats` call reports under the same names (the rest are the load's)."""


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str
    """Checkpoint folder (for the sim engine, a folder with config.json is enough)."""
    engine: str = "builtin"
    served_model_name: str | None = None
    """Name requests use; None takes the folder's name."""
    worker_id: str | None = None
    """None: "<engine>-<random>"."""
    host: str = "127.0.0.1"
    port: int = 0
    """0: the OS picks a free port."""
    role: Role = "agg"
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    dtype: str = "bfloat16"
    device: str = "cpu"
    speedup: float = 1.0
    """Sim engine only: how much faster than the timing model's real time."""
    lease_ttl: float = DEFAULT_TTL
    load_interval: float = 0.5
    drain_timeout: float = 30.0
    """Longest wait for in-flight requests when draining."""
    kv_transfer: bool = True
    """Serve and load KV blocks for disaggregation (any role can: the role is a routing hint)."""
    kv_hold_timeout: float = 120.0
    """Prefill side: free blocks no decode worker has read after this many seconds."""

    def __post_init__(self) -> None:
        if self.lease_ttl <= 0 or self.load_interval <= 0 or self.drain_timeout < 0:
            raise ValueError("lease_ttl and load_interval must be > 0, drain_timeout >= 0")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name


class Worker:
    def __init__(
        self, config: WorkerConfig, discovery: Discovery | None = None, executor: Executor | None = None
    ) -> None:
        self.config = config
        self.discovery = discovery
        self.worker_id = config.worker_id or f"{config.engine}-{uuid.uuid4().hex[:8]}"
        self.model_name = config.model_name  # resolves a path: once, not per request
        self._executor = executor
        self.engine: AsyncEngine | None = None
        self.connector: DisaggConnector | None = None
        self.publisher: KvEventPublisher | None = None
        self.server = RpcServer(self._handle, host=config.host, port=config.port, name=self.worker_id)
        self.lease: Lease | None = None
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._load_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        """Build the engine (off the event loop: loading weights blocks), listen, register."""
        cfg = self.config
        if cfg.kv_transfer and self._executor is None:
            layout = layout_from_config(
                cfg.model_dir,
                cfg.engine_config.block_size,
                compute_dtype(cfg.dtype, cfg.device) if cfg.engine == "builtin" else "bfloat16",
                self.model_name,
                cfg.engine,
            )
            self.connector = DisaggConnector(
                layout, worker_id=self.worker_id, host=cfg.host, hold_timeout_s=cfg.kv_hold_timeout
            )
        if self._executor is None:
            self._executor = await asyncio.to_thread(
                build_executor,
                cfg.engine,
                cfg.model_dir,
                cfg.engine_config,
                dtype=cfg.dtype,
                device=cfg.device,
                speedup=cfg.speedup,
                kv_connector=self.connector,
            )
        conn = (self.connector, self.connector) if self.connector is not None else None
        self.publisher = KvEventPublisher(asyncio.get_running_loop())
        core = EngineCore(cfg.engine_config, self._executor, connector=conn, event_sink=self.publisher.sink)
        self.engine = AsyncEngine(core, name=self.worker_id)
        await self.server.start()
        if self.discovery is not None:
            self.lease = await self.discovery.register(self.info(), cfg.lease_ttl)
            self._load_task = asyncio.create_task(self._publish_load(), name="load-publisher")
        log.info("worker %s serving %s on %s", self.worker_id, cfg.model_name, self.address)

    def info(self) -> WorkerInfo:
        assert self.engine is not None, "start() the worker first"
        core = self.engine.core
        return WorkerInfo(
            worker_id=self.worker_id,
            address=self.address,
            model=self.model_name,
            model_dir=str(Path(self.config.model_dir).resolve()),
            role=self.config.role,
            block_size=self.config.engine_config.block_size,
            num_blocks=core.kv.num_blocks,
            max_model_len=core.max_model_len,
            max_num_batched_tokens=self.config.engine_config.max_num_batched_tokens,
            hardware=detect_hardware(self.config.engine, self.config.device),
            status="draining" if self.draining else "ready",
            load=self.load(),
            engine=self.config.engine,
            kv_layout=self.connector.layout if self.connector else None,
            kv_address=self.connector.address if self.connector else "",
            takes_announcements=self.engine.takes_announcements,
        )

    def load(self) -> WorkerLoad:
        assert self.engine is not None, "start() the worker first"
        s = self.engine.stats
        return WorkerLoad(
            active_requests=self._active,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_used_blocks=s.num_used_blocks,
            kv_usage=s.kv_usage,
        )

    def stats(self) -> WorkerStats:
        assert self.engine is not None, "start() the worker first"
        s = self.engine.stats
        c = self.connector
        return WorkerStats(
            worker_id=self.worker_id,
            status="draining" if self.draining else "ready",
            load=self.load(),
            kv_loads=c.num_loads if c else 0,
            kv_load_failures=c.num_load_failures if c else 0,
            kv_load_seconds_total=c.load_seconds_total if c else 0.0,
            kv_load_bytes_total=c.load_bytes_total if c else 0,
            **{name: getattr(s, name) for name in _ENGINE_COUNTERS},
        )

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking work and wait for in-flight requests. True if they all finished in time."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self.draining = True
        log.info("worker %s draining (%d in flight, timeout %.0f s)", self.worker_id, self._active, timeout)
        if self.lease is not None:
            await self.lease.update(status="draining", load=self.load())
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            log.warning("worker %s: drain timed out with %d requests in flight", self.worker_id, self._active)
            return False

    async def stop(self) -> None:
        """Deregister, close connections (aborting what is left) and stop the engine."""
        if self._load_task is not None:
            self._load_task.cancel()
        if self.lease is not None:
            await self.lease.revoke()
        await self.server.close()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if self.connector is not None:
            await asyncio.to_thread(self.connector.close)
        log.info("worker %s stopped", self.worker_id)

    def _handle(self, call: Call) -> AsyncIterator[Any] | Pushed:
        """A call's results. A generate call reaches the engine before this returns."""
        if isinstance(call, GenerateCall):
            return self._generate(call.request)
        if isinstance(call, ExpectCall):
            if self.engine is not None and not self.draining:
                self.engine.expect(call.request_id)
            return _NO_RESULTS
        return self._serve(call)

    def _generate(self, req: GenerateRequest) -> Pushed:
        assert self.engine is not None, "start() the worker first"
        if self.draining:
            raise OverloadedError(f"worker {self.worker_id} is draining")
        if req.model != self.model_name:
            raise ModelNotFoundError(f"worker {self.worker_id} serves {self.model_name!r}, not {req.model!r}")
        return _Generate(self, req)

    async def _serve(self, call: Call) -> AsyncGenerator[Any, None]:
        if isinstance(call, StatsCall):
            yield self.stats()
            return
        if isinstance(call, KvEventsCall):
            assert self.publisher is not None, "start() the worker first"
            async for events in self.publisher.subscribe():
                yield KvEventBatch(events)
            return
        if isinstance(call, KvDumpCall):
            assert self.engine is not None, "start() the worker first"
            yield KvDumpReply(await self.engine.run_on_engine(lambda core: core.kv_dump()))
            return
        raise InvalidRequestError(f"a worker does not serve {type(call).__name__}")

    async def _publish_load(self) -> None:
        assert self.lease is not None
        last = None
        while True:
            await asyncio.sleep(self.config.load_interval)
            load = self.load()
            if load != last:
                last = load
                await self.lease.update(load=load)


def detect_hardware(engine: str, device: str) -> Hardware:
    """What this worker runs on, for the registry (best effort; never fails)."""
    if engine == "sim":
        return Hardware(device="sim", name="simulated", count=1)
    if device.startswith("cuda"):
        try:
            import torch

            props = torch.cuda.get_device_properties(torch.device(device))
            return Hardware(device="cuda", name=props.name, count=1, memory_bytes=props.total_memory)
        except Exception as e:
            log.warning("cannot read CUDA device properties: %s", e)
            return Hardware(device="cuda")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return Hardware(device="cpu", name=os.uname().machine, count=1, memory_bytes=memory)


class _Generate(Pushed):
    """A generate call: the engine's outputs go straight to the request-plane stream (no queue, no
    task per request). Counts as one of its worker's active requests until the stream is over
    (drain waits for none to be left); a stream cancelled before its end aborts the engine request,
    which frees its KV blocks."""

    __slots__ = ("_open", "_req", "_worker")

    def __init__(self, worker: Worker, req: GenerateRequest) -> None:
        self._worker = worker
        self._req = req
        self._open = True
        worker._active += 1
        worker._idle.clear()

    def start(self, sink: ResultSink) -> None:
        engine = self._worker.engine
        assert engine is not None, "start() the worker first"
        engine.push(self._req, sink, accept=True)

    def close(self, *, finished: bool) -> None:
        if not self._open:
            return
        self._open = False
        worker = self._worker
        if not finished and worker.engine is not None:
            worker.engine.abort(self._req.request_id)
        worker._active -= 1
        if worker._active == 0:
            worker._idle.set()


class _NoResults:
    """The results of a notice (an `ExpectCall`): none."""

    def __aiter__(self) -> _NoResults:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


_NO_RESULTS = _NoResults()
