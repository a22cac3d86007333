"""WorkerMetrics: every live worker's engine counters, fetched when the frontend's /metrics is read.

    metrics = WorkerMetrics(pool, backend.workers)
    registry.register(metrics)     # collect() yields what the last refresh got
    await metrics.refresh()        # one `stats` call per live worker, all at once, bounded in time

Why pull at scrape time: the workers are processes of their own (later, on other machines), and a
user's Prometheus should need one target, the frontend, to see per worker the engine's queue time,
prefill time and inter-token gaps (the frontend's own TTFT and ITL minus these is what the serving
path added), KV usage, prefix-cache hits, preemptions and KV transfers. One small request-plane call
per worker per scrape costs nothing next to the token streams.

A worker that does not answer within `timeout` shows `tandem_worker_up 0` and no other series: stale
counters would read as a stalled engine. Every series is labelled worker, model and role.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tandem.control.rpc_client import RpcClientPool
from tandem.protocol.registry import GAP_BUCKETS, LATENCY_BUCKETS, WorkerInfo, WorkerStats
from tandem.protocol.rpc import StatsCall

log = logging.getLogger(__name__)

PREFIX = "tandem_worker"
LABELS = ("worker", "model", "role")

_GAUGES: tuple[tuple[str, str, Callable[[WorkerStats], float]], ...] = (
    ("running_requests", "Requests in the engine's running batch", lambda s: s.load.num_running),
    ("waiting_requests", "Requests waiting for their first step (or for KV)", lambda s: s.load.num_waiting),
    ("active_requests", "Requests the worker is serving", lambda s: s.load.active_requests),
    ("kv_blocks", "KV cache capacity in blocks", lambda s: s.num_blocks),
    ("kv_free_blocks", "KV blocks free (cached prefixes count as free)", lambda s: s.num_free_blocks),
    ("kv_usage_ratio", "Share of KV blocks held by requests", lambda s: s.load.kv_usage),
)
_COUNTERS: tuple[tuple[str, str, Callable[[WorkerStats], float]], ...] = (
    ("prompt_tokens", "Prompt tokens admitted", lambda s: s.prompt_tokens_total),
    ("cached_prompt_tokens", "Prompt tokens found in the KV prefix cache", lambda s: s.cached_tokens_total),
    ("preemptions", "Requests preempted for lack of KV blocks", lambda s: s.num_preemptions),
    ("steps", "Engine steps", lambda s: s.num_steps),
    ("prefill_steps", "Engine steps that computed prompt tokens", lambda s: s.prefill_steps),
    ("prefill_requests", "Prompt pieces computed over all prefill steps", lambda s: s.prefill_requests_total),
    ("busy_seconds", "Engine time spent in steps", lambda s: s.busy_seconds_total),
    ("kv_loads", "KV loads from peers started", lambda s: s.kv_loads),
    ("kv_load_failures", "KV loads from peers that failed", lambda s: s.kv_load_failures),
    ("kv_load_seconds", "Wall time of finished KV loads", lambda s: s.kv_load_seconds_total),
    ("kv_load_bytes", "Bytes of KV loaded from peers", lambda s: s.kv_load_bytes_total),
)
_Hist = Callable[[WorkerStats], tuple[tuple[int, ...], float]]
"""A histogram's counts per bucket and its sum, from a worker's stats."""
_HISTOGRAMS: tuple[tuple[str, str, tuple[float, ...], _Hist], ...] = (
    (
        "request_queue_seconds",
        "Engine queue: request handed to the engine -> its first step",
        LATENCY_BUCKETS,
        lambda s: (s.queue_buckets, s.queue_seconds_total),
    ),
    (
        "request_prefill_seconds",
        "Engine prefill: a request's first step -> its first token",
        LATENCY_BUCKETS,
        lambda s: (s.prefill_buckets, s.prefill_seconds_total),
    ),
    (
        "inter_token_latency_seconds",
        "Engine-side gaps between a request's later tokens",
        GAP_BUCKETS,
        lambda s: (s.decode_buckets, s.decode_seconds_total),
    ),
)


class WorkerMetrics(Collector):
    def __init__(
        self, pool: RpcClientPool, workers: Callable[[], list[WorkerInfo]], timeout: float = 1.0
    ) -> None:
        self.pool = pool
        self.workers = workers
        self.timeout = timeout
        self._latest: list[tuple[WorkerInfo, WorkerStats | None]] = []

    async def refresh(self) -> None:
        workers = self.workers()
        stats = await asyncio.gather(*(self._stats(w) for w in workers))
        self._latest = list(zip(workers, stats, strict=True))

    async def _stats(self, worker: WorkerInfo) -> WorkerStats | None:
        try:
            reply = await asyncio.wait_for(self.pool.call(worker.address, StatsCall()), self.timeout)
        except Exception as e:  # unreachable, dead, too slow: reported as up 0
            log.debug("stats from worker %s failed: %r", worker.worker_id, e)
            return None
        return reply if isinstance(reply, WorkerStats) else None

    def collect(self) -> Iterator[Metric]:
        latest = self._latest
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 if the worker answered the last scrape", labels=LABELS)
        for info, stats in latest:
            up.add_metric(_labels(info), 0.0 if stats is None else 1.0)
        yield up
        answered = [(_labels(info), s) for info, s in latest if s is not None]
        for name, doc, get in _GAUGES:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=LABELS)
            for labels, s in answered:
                gauge.add_metric(labels, float(get(s)))
            yield gauge
        for name, doc, get in _COUNTERS:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=LABELS)
            for labels, s in answered:
                counter.add_metric(labels, float(get(s)))
            yield counter
        for name, doc, bounds, get_hist in _HISTOGRAMS:
            hist = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=LABELS)
            for labels, s in answered:
                counts, total = get_hist(s)
                if len(counts) == len(bounds) + 1:  # else a worker that keeps no histogram
                    hist.add_metric(labels, cumulative_buckets(bounds, counts), sum_value=total)
            yield hist

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _labels(info: WorkerInfo) -> list[str]:
    return [info.worker_id, info.model, info.role]


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus (le, cumulative count) pairs from per-bucket counts (the last past every bound)."""
    les = [repr(float(b)) for b in bounds] + ["+Inf"]
    return list(zip(les, map(float, accumulate(counts)), strict=True))
