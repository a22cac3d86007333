"""WorkerMetrics: the workers' engine counters as labelled Prometheus series, fetched per scrape."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.protocol.registry import GAP_BUCKETS, LATENCY_BUCKETS, WorkerInfo, WorkerLoad, WorkerStats
from tandem.router.worker_metrics import WorkerMetrics


class _Pool:
    """Answers `stats` calls by address: a WorkerStats, an error, or never (a hung worker)."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies

    async def call(self, address: str, call: Any) -> Any:
        reply = self.replies[address]
        if reply == "hang":
            await asyncio.sleep(3600)
        if isinstance(reply, Exception):
            raise reply
        return reply


def _info(n: int, role: str = "agg") -> WorkerInfo:
    return WorkerInfo(f"w{n}", f"127.0.0.1:{7000 + n}", "tiny", "/m", role=role)  # type: ignore[arg-type]


def _stats(worker_id: str, buckets: bool = True) -> WorkerStats:
    queue = [0] * (len(LATENCY_BUCKETS) + 1)
    queue[LATENCY_BUCKETS.index(0.01)] = 3  # three requests queued 5-10 ms
    queue[-1] = 1  # one past 60 s
    decode = [0] * (len(GAP_BUCKETS) + 1)
    decode[GAP_BUCKETS.index(0.02)] = 40
    return WorkerStats(
        worker_id,
        "ready",
        WorkerLoad(active_requests=5, num_running=4, num_waiting=1, num_used_blocks=8, kv_usage=0.25),
        num_blocks=32,
        num_free_blocks=24,
        prompt_tokens_total=400,
        cached_tokens_total=128,
        queue_seconds_total=61.0,
        queued_requests_total=4,
        decode_seconds_total=0.6,
        decode_tokens_total=40,
        queue_buckets=tuple(queue) if buckets else (),
        decode_buckets=tuple(decode) if buckets else (),
    )


def _scrape(replies: dict[str, Any], workers: list[WorkerInfo]) -> dict[tuple[str, tuple], float]:
    metrics = WorkerMetrics(_Pool(replies), lambda: workers, timeout=0.2)  # type: ignore[arg-type]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    asyncio.run(metrics.refresh())
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _labels(worker: str, role: str = "agg", **extra: str) -> tuple:
    return tuple(sorted({"worker": worker, "model": "tiny", "role": role, **extra}.items()))


def test_each_worker_exports_load_counters_and_phase_histograms() -> None:
    workers = [_info(0), _info(1, "decode")]
    s = _scrape({w.address: _stats(w.worker_id) for w in workers}, workers)
    for w in workers:
        lab = _labels(w.worker_id, w.role)
        assert s[("tandem_worker_up", lab)] == 1
        assert s[("tandem_worker_running_requests", lab)] == 4
        assert s[("tandem_worker_kv_usage_ratio", lab)] == 0.25
        assert s[("tandem_worker_kv_blocks", lab)] == 32
        assert s[("tandem_worker_prompt_tokens_total", lab)] == 400
        assert s[("tandem_worker_cached_prompt_tokens_total", lab)] == 128
        # Cumulative buckets from per-bucket counts; the count includes the one past every bound.
        q = "tandem_worker_request_queue_seconds"
        assert s[(f"{q}_bucket", _labels(w.worker_id, w.role, le="0.005"))] == 0
        assert s[(f"{q}_bucket", _labels(w.worker_id, w.role, le="0.01"))] == 3
        assert s[(f"{q}_bucket", _labels(w.worker_id, w.role, le="60.0"))] == 3
        assert s[(f"{q}_bucket", _labels(w.worker_id, w.role, le="+Inf"))] == 4
        assert (s[(f"{q}_count", lab)], s[(f"{q}_sum", lab)]) == (4, 61.0)
        itl = "tandem_worker_inter_token_latency_seconds"
        assert s[(f"{itl}_bucket", _labels(w.worker_id, w.role, le="0.02"))] == 40
        assert s[(f"{itl}_sum", lab)] == 0.6


def test_a_worker_that_fails_or_hangs_is_down_with_no_stale_series() -> None:
    workers = [_info(0), _info(1), _info(2)]
    replies = {workers[0].address: _stats("w0"), workers[1].address: ConnectionRefusedError()}
    replies[workers[2].address] = "hang"
    s = _scrape(replies, workers)
    assert [s[("tandem_worker_up", _labels(w))] for w in ("w0", "w1", "w2")] == [1, 0, 0]
    assert ("tandem_worker_running_requests", _labels("w0")) in s
    others = [name for name, labels in s if name != "tandem_worker_up" and dict(labels)["worker"] != "w0"]
    assert others == []


def test_a_worker_without_histograms_still_exports_its_counters() -> None:
    workers = [_info(0)]
    s = _scrape({workers[0].address: _stats("w0", buckets=False)}, workers)
    assert s[("tandem_worker_prompt_tokens_total", _labels("w0"))] == 400
    assert not any(name.startswith("tandem_worker_request_queue_seconds") for name, _ in s)
