"""KvPolicy: the KV-aware `Policy` of the HTTP router, with its embedded event plane.

    RouterBackend._stream:  sync(live workers)  -> follow new workers' KV events, purge gone ones
                            pick(req, cands)    -> KvRouter.route (overlap + own load count)
                            first output        -> on_first_token  (prefill done)
                            stream over         -> on_finish       (KV freed)

Event plane, per worker (one task each): open a `kv_events` stream, then take a `kv_dump` and apply
it (bootstrap: a new router or a second replica starts from dumps); apply each batch; on a gap in
event ids fetch a fresh dump; on a broken stream retry after a pause. A worker that leaves discovery
is purged from the index. Approximate mode (`kv-approx`) opens no streams: it indexes its own
decisions for a TTL.

A disaggregated decode leg (its request carries the prefill side's KV hand-off) is placed by load
alone: its prompt's KV arrives by transfer, so a cached prefix there saves nothing. Load shedding:
with a busy limit set, a request that finds every candidate past it raises BusyError (503), which
RouterBackend's wait queue (`router/admission.py`), when configured, holds instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.control.rpc_client import RpcClientPool
from tandem.kvcache.hashing import block_hashes
from tandem.protocol.errors import BusyError
from tandem.protocol.messages import GenerateRequest
from tandem.protocol.registry import WorkerInfo
from tandem.protocol.rpc import KvDumpCall, KvEventBatch, KvEventsCall
from tandem.router.kv import KvRouter, KvRouterConfig
from tandem.router.load_board import LoadBoard
from tandem.router.policy import KvPolicyConfig, WorkerLoad

log = logging.getLogger(__name__)

TUNED = KvPolicyConfig(overlap_weight=10.0, decode_weight=0.3, queued_weight=1.0, long_prompt_tokens=16384)
"""Defaults from the Mooncake replay (docs/benchmarks.md, "KV-aware router")."""

RESUBSCRIBE_S = 0.5


class KvPolicy:
    """A `router.basic.Policy` plus the hooks RouterBackend calls: bind, sync, on_first_token,
    on_finish, board_load, share_board, close."""

    def __init__(self, config: KvRouterConfig | None = None, pool: RpcClientPool | None = None) -> None:
        self.router = KvRouter(config or KvRouterConfig(policy=TUNED, batch_queued_prefill=True))
        self.name = "kv-approx" if self.router.approximate else "kv"
        self.pool = pool
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._addresses: dict[str, str] = {}
        self._block_sizes: dict[str, int] = {}

    @property
    def approximate(self) -> bool:
        return self.router.approximate

    def bind(self, pool: RpcClientPool) -> None:
        """Use the backend's connection pool for the event streams."""
        self.pool = pool

    def sync(self, workers: Iterable[WorkerInfo]) -> None:
        """Follow every live worker's events; purge workers that are gone. Call with the whole live
        set (any model); cheap when nothing changed."""
        live = {w.worker_id: w for w in workers}
        for wid in [w for w in self._addresses if w not in live]:
            self._drop(wid)
        for wid, info in live.items():
            if self._addresses.get(wid) == info.address:
                continue
            if wid in self._addresses:
                self._drop(wid)  # same id, new address: a restarted worker with an empty cache
            self._addresses[wid] = info.address
            self._block_sizes[wid] = info.block_size
            if not self.approximate and self.pool is not None:
                self._followers[wid] = asyncio.get_running_loop().create_task(
                    self._follow(wid, info.address), name=f"kv-events-{wid}"
                )

    def pick(self, request: GenerateRequest, candidates: Sequence[WorkerLoad]) -> str:
        assert candidates, "pick() needs at least one candidate"
        decode_leg = bool(request.kv_transfer_params and "remote_handle" in request.kv_transfer_params)
        # Candidates serve one model, so they share a block size (registration checks the layout).
        bs = self._block_sizes.get(candidates[0].worker_id, self.router.config.block_size)
        # A decode leg's KV arrives from the prefill worker: it is placed by load, no hashes needed.
        hashes = [] if decode_leg else block_hashes(request.prompt_token_ids, bs)
        decision = self.router.route(
            request.request_id,
            hashes,
            len(request.prompt_token_ids),
            candidates,
            now=time.monotonic(),
            overrides=_overrides(request),
            kv_transferred=decode_leg,
            block_size=bs,
        )
        if decision is None:
            raise BusyError("every worker is past its busy limit; retry shortly")
        return decision.worker_id

    def on_first_token(self, request_id: str) -> None:
        self.router.prefill_done(request_id)

    def on_finish(self, request_id: str) -> None:
        self.router.finish(request_id)

    def board_load(self, worker_id: str) -> tuple[int, int]:
        """This router's KV blocks and queued prefill tokens on a worker, for the load board."""
        return self.router.own_load(worker_id)

    def share_board(self, board: LoadBoard) -> None:
        """Several frontends: add the other routers' blocks and queued tokens to this one's."""
        self.router.others_load = lambda ids: board.others(ids)[:, 1:]

    async def close(self) -> None:
        for wid in list(self._followers):
            self._drop(wid)

    def collector(self) -> Collector:
        return _RouterCollector(self.router, lambda: list(self._addresses))

    def _drop(self, wid: str) -> None:
        task = self._followers.pop(wid, None)
        if task is not None:
            task.cancel()
        self._addresses.pop(wid, None)
        self._block_sizes.pop(wid, None)
        self.router.remove_worker(wid)
        log.info("KV router: worker %s purged from the index", wid)

    async def _follow(self, wid: str, address: str) -> None:
        assert self.pool is not None
        while True:
            try:
                stream = await self.pool.open(address, KvEventsCall())
                async with stream:
                    # Subscribe first, then dump: events up to the dump's id are skipped as applied,
                    # later ones are in the stream, so nothing falls between the two.
                    await self._resync(wid, address)
                    async for batch in stream:
                        assert isinstance(batch, KvEventBatch), f"unexpected {type(batch).__name__}"
                        if not self.router.apply_events(wid, batch.events):
                            await self._resync(wid, address)
                return  # the worker ended the stream: it is stopping
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("KV events from %s (%s): %s; resubscribing", wid, address, e)
                await asyncio.sleep(RESUBSCRIBE_S)

    async def _resync(self, wid: str, address: str) -> None:
        assert self.pool is not None
        reply = await self.pool.call(address, KvDumpCall())
        self.router.apply_dump(wid, reply.dump)
        log.info("KV router: %s synced from a dump (%d blocks)", wid, len(reply.dump.blocks))


def _overrides(request: GenerateRequest) -> dict[str, Any] | None:
    """Per-request policy fields from annotations: `router.overlap_weight`, `router.decode_weight`,
    `router.queued_weight`, `router.temperature` (floats; unknown or malformed keys are ignored)."""
    if not request.annotations:
        return None
    out: dict[str, Any] = {}
    for key, value in request.annotations.items():
        if key.startswith("router.") and key[7:] in _OVERRIDABLE:
            try:
                out[key[7:]] = float(value)
            except ValueError:
                log.warning("request %s: ignoring %s=%r", request.request_id, key, value)
    return out or None


_OVERRIDABLE = frozenset({"overlap_weight", "decode_weight", "queued_weight", "temperature"})


class _RouterCollector(Collector):
    """Router metrics for the frontend's /metrics: hit rate, decision time, load and decisions."""

    def __init__(self, router: KvRouter, workers: Any) -> None:
        self.router = router
        self.workers = workers

    def collect(self) -> Iterator[Any]:
        m = self.router.metrics
        p = "tandem_router"
        yield CounterMetricFamily(f"{p}_prompt_tokens", "Prompt tokens routed", value=m.prompt_tokens)
        yield CounterMetricFamily(
            f"{p}_cached_tokens", "Prompt tokens the chosen worker held", value=m.predicted_cached_tokens
        )
        yield GaugeMetricFamily(
            f"{p}_hit_rate", "Cached / prompt tokens, as routed", value=m.snapshot()["predicted_hit_rate"]
        )
        yield CounterMetricFamily(f"{p}_shed", "Requests refused: all workers busy", value=m.shed)
        yield CounterMetricFamily(f"{p}_resyncs", "KV index resyncs from a dump", value=m.resyncs)
        for q in (0.5, 0.99):
            yield GaugeMetricFamily(
                f"{p}_decision_seconds_p{int(q * 100)}",
                "Routing decision time over the last 10,000 decisions",
                value=m.percentile_ms(q) / 1e3,
            )
        decisions = CounterMetricFamily(f"{p}_decisions", "Requests routed per worker", labels=["worker"])
        blocks = GaugeMetricFamily(f"{p}_active_blocks", "Active KV blocks per worker", labels=["worker"])
        queued = GaugeMetricFamily(
            f"{p}_queued_prefill_tokens", "Prefill tokens routed, not yet done", labels=["worker"]
        )
        for load in self.router.loads(sorted(set(self.workers()) | set(m.decisions))):
            decisions.add_metric([load.worker_id], m.decisions[load.worker_id])
            blocks.add_metric([load.worker_id], load.active_blocks)
            queued.add_metric([load.worker_id], load.queued_prefill_tokens)
        yield decisions
        yield blocks
        yield queued

    def describe(self) -> Iterator[Any]:
        return iter(())
