"""Frontend Prometheus metrics, in a registry of the app's own (tests build many apps).

Latency histograms are observed once per engine output (inter-token latency) on the hot path, so
they use `FastHistogram`: a bisect and two additions, no lock (the event loop is one thread), exposed
through a custom collector in the standard histogram format. Counters and the gauge change once per
request and use prometheus-client directly.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tandem.protocol.registry import GAP_BUCKETS
from tandem.router.worker_metrics import cumulative_buckets

log = logging.getLogger(__name__)

PREFIX = "tandem_frontend"
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
LAG_SAMPLE_S = 0.05


class FastHistogram(Collector):
    """A label-less histogram for single-threaded hot paths."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Record `value` `n` times (an output of n tokens after one gap gives n equal ITLs)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def collect(self) -> Iterator[HistogramMetricFamily]:
        buckets = cumulative_buckets(self.bounds, self.counts)
        yield HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        return iter(())


class FrontendMetrics:
    """Every metric the frontend exports; `render()` gives the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Finished HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "Generation requests in progress", registry=r)
        self.active = 0
        """`inflight`'s value, for the frontend's own decisions (a gauge has no public getter)."""
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens", "Prompt tokens served from a KV prefix cache", registry=r
        )
        self.ttft = FastHistogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS
        )
        self.itl = FastHistogram(f"{PREFIX}_inter_token_latency_seconds", "Inter-token latency", GAP_BUCKETS)
        self.e2e = FastHistogram(f"{PREFIX}_request_duration_seconds", "End-to-end request time", E2E_BUCKETS)
        self.loop_lag = FastHistogram(
            f"{PREFIX}_event_loop_lag_seconds",
            f"How late the event loop ran a timer set every {LAG_SAMPLE_S * 1e3:g} ms (it was busy)",
            LAG_BUCKETS,
        )
        for h in (self.ttft, self.itl, self.e2e, self.loop_lag):
            r.register(h)
        self._status_children: dict[tuple[str, int], Counter] = {}
        self.refreshers: list[Callable[[], Awaitable[None]]] = []
        """Awaited before each render: collectors whose numbers live elsewhere (the workers')."""
        self.index = 0
        """This process's number among the deployment's frontend processes."""
        self.peers: Callable[[], list[tuple[int, str]]] | None = None
        """With several frontend processes: the others' (index, URL of their own /metrics)."""

    def count_request(self, endpoint: str, status: int) -> None:
        child = self._status_children.get((endpoint, status))
        if child is None:
            child = self._status_children[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()

    def count_tokens(self, prompt: int, output: int, cached: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.output_tokens.inc(output)
        if cached:
            self.cached_tokens.inc(cached)

    def request_started(self) -> None:
        self.inflight.inc()
        self.active += 1

    def request_ended(self) -> None:
        self.inflight.dec()
        self.active -= 1

    async def render(self, process_only: bool = False) -> bytes:
        """The /metrics body. With peers (and not `process_only`), every frontend process's."""
        if self.refreshers:
            await asyncio.gather(*(refresh() for refresh in self.refreshers))
        body = generate_latest(self.registry)
        if self.peers is None or process_only:
            return body
        return await merge_frontends(body, self.index, self.peers())

    async def watch_loop_lag(self, interval: float = LAG_SAMPLE_S) -> None:
        """Sample the event loop's responsiveness into `loop_lag` until cancelled.

        Every stream and every new request waits whenever the one loop is busy; a block of a few
        ms (a burst of prompts to tokenize, a garbage collection) shows here before it shows as
        tail latency. 20 wake-ups a second: each one costs an idle process ~80 us of CPU on a
        2-vCPU VM (the wake-up, not the Python), so sampling every 10 ms kept an idle frontend
        process at 2% of a core, and every 50 ms at 0.8% (session 23). A block of 5 ms is still
        seen one time in ten, and a minute gives 1,200 samples.
        """
        while True:
            due = time.perf_counter() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, time.perf_counter() - due))


async def merge_frontends(
    own: bytes, index: int, peers: list[tuple[int, str]], timeout: float = 2.0
) -> bytes:
    """One /metrics body for a deployment whose frontend processes share a port.

    A scrape reaches whichever process the kernel hands the connection to, so that process fetches
    the others' own metrics (`peers`: index and URL on their private 127.0.0.1 listeners) and
    adds them, each series labelled `frontend="<index>"`. The workers' series (`tandem_worker_*`)
    are read from the same workers by every process: this process's copy is kept as is. A peer that
    does not answer within `timeout` is left out (and logged), not waited for.
    """

    async def fetch(client: httpx.AsyncClient, url: str) -> str | None:
        try:
            r = await client.get(url)
            r.raise_for_status()
            return r.text
        except httpx.HTTPError as e:
            log.warning("frontend metrics at %s not read: %s", url, e)
            return None

    async with httpx.AsyncClient(timeout=timeout) as client:
        texts = await asyncio.gather(*(fetch(client, url) for _, url in peers))
    families: dict[str, Metric] = {}
    bodies = [(index, own.decode())] + [(i, t) for (i, _), t in zip(peers, texts, strict=True) if t]
    for i, text in bodies:
        for family in text_string_to_metric_families(text):
            shared = family.name.startswith("tandem_worker_")
            if shared and i != index:
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            label = {} if shared else {"frontend": str(i)}
            merged.samples.extend(s._replace(labels={**s.labels, **label}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)

    def describe(self) -> Iterator[Metric]:
        return iter(())
