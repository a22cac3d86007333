from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from tandem.frontend.metrics import FastHistogram, FrontendMetrics


def _samples(body: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_fast_histogram_exposes_cumulative_buckets() -> None:
    m = FrontendMetrics()
    m.itl.observe(0.0007)
    m.itl.observe(0.003, n=3)
    m.itl.observe(100.0)
    s = _samples(asyncio.run(m.render()))
    name = "tandem_frontend_inter_token_latency_seconds"
    assert s[(f"{name}_bucket", (("le", "0.001"),))] == 1
    assert s[(f"{name}_bucket", (("le", "0.005"),))] == 4
    assert s[(f"{name}_bucket", (("le", "+Inf"),))] == 5
    assert s[(f"{name}_count", ())] == 5
    assert abs(s[(f"{name}_sum", ())] - (0.0007 + 0.009 + 100.0)) < 1e-9


def test_apps_have_separate_registries() -> None:
    a, b = FrontendMetrics(), FrontendMetrics()
    a.count_request("chat", 200)
    a.count_tokens(10, 5, 4)
    sa, sb = _samples(asyncio.run(a.render())), _samples(asyncio.run(b.render()))
    key = ("tandem_frontend_requests_total", (("endpoint", "chat"), ("status", "200")))
    assert sa[key] == 1 and key not in sb
    assert sa[("tandem_frontend_cached_tokens_total", ())] == 4


def test_bucket_edges_are_inclusive() -> None:
    h = FastHistogram("h", "doc", (1.0, 2.0))
    h.observe(1.0)
    assert h.counts == [1, 0, 0]


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    m = FrontendMetrics()
    watch = asyncio.create_task(m.watch_loop_lag(interval=0.005))
    await asyncio.sleep(0.05)  # a responsive loop: every sample well under the blocked one
    time.sleep(0.06)  # what a long tokenization or a full GC does to every stream
    await asyncio.sleep(0.02)
    watch.cancel()
    s = _samples(await m.render())
    name = "tandem_frontend_event_loop_lag_seconds"
    total = s[(f"{name}_count", ())]
    assert total >= 5
    assert total - s[(f"{name}_bucket", (("le", "0.05"),))] == 1  # the one block, seen once
    assert s[(f"{name}_sum", ())] >= 0.05
