"""Router-side timings of disaggregated requests, as Prometheus histograms for the frontend's /metrics.

    prefill  prefill request sent -> the prefill worker's last output back (prompt KV held there,
             first token known): routing, queueing and the prefill step on the prefill worker
    handoff  decode request sent -> the decode worker's first output: its queueing, the KV load
             from the prefill worker, and its first decode step

The client sees the first token after `prefill` (the router streams it at once); the second token
after `prefill + handoff`. Summed over requests, these split a slow TTFT or a slow second token
into the side that caused it; worker stats (`kv_load_seconds_total`, `busy_seconds_total`) split
each side further.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "tandem_router_disagg"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DisaggMetrics(Collector):
    """Observed by `RouterBackend` once per phase of a remote-prefill request; register it in a
    registry to export it (its metrics belong to no registry of their own)."""

    def __init__(self) -> None:
        self.prefill = Histogram(
            f"{PREFIX}_prefill_seconds",
            "Remote prefill: request sent to the prefill worker -> its first token back",
            buckets=BUCKETS,
            registry=None,
        )
        self.handoff = Histogram(
            f"{PREFIX}_handoff_seconds",
            "KV hand-off: request sent to the decode worker -> its first token (KV load included)",
            buckets=BUCKETS,
            registry=None,
        )
        self.fallbacks = Counter(
            f"{PREFIX}_fallbacks",
            "Remote prefills that failed and were prefilled on a decode worker instead",
            registry=None,
        )

    def collect(self) -> Iterator[Metric]:
        for m in (self.prefill, self.handoff, self.fallbacks):
            yield from m.collect()

    def describe(self) -> Iterator[Metric]:
        return iter(())
