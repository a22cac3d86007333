"""The fleet simulator with a busy limit on the KV router: requests that find every worker busy
are refused, or wait in the router's FIFO queue (bounded in size and time) as on the HTTP router."""

from __future__ import annotations

import pytest

from tandem.bench.traces import TokenSpace, TraceRequest
from tandem.sim.fleet import Fleet, FleetConfig
from tandem.sim.routing import make_router

SPACE = TokenSpace()
BUSY = {"busy_prefill_tokens": 1000}
"""A worker is busy while a 1,000-token prompt routed there has not produced its first token."""


def burst(n: int, isl: int = 1000, osl: int = 20) -> list[TraceRequest]:
    blocks = -(-isl // 512)
    return [TraceRequest(0.0, isl, osl, tuple(range(1000 + i * blocks, 1000 + (i + 1) * blocks)), i, SPACE)
            for i in range(n)]  # fmt: skip


def fleet(queue_size: int = 0, queue_timeout: float = 30.0) -> Fleet:
    router = make_router("kv", BUSY)
    return Fleet(FleetConfig(num_workers=2), router, queue_size=queue_size, queue_timeout=queue_timeout)


def test_without_a_queue_requests_past_the_busy_limit_are_refused() -> None:
    m = fleet().run(burst(8))
    s = m.summary()
    assert s["completed"] == 2 and s["router_shed"] == 6 and s["router_waited"] == 0
    assert sorted(r.engine for r in m.records if r.finished) == [0, 1]


def test_a_queue_holds_them_and_routes_them_in_order_as_prefills_finish() -> None:
    m = fleet(queue_size=8).run(burst(8))
    s = m.summary()
    assert s["completed"] == 8 and s["router_waited"] == 6 and s["router_shed"] == 0
    firsts = [r.first_token for r in m.records]
    assert firsts == sorted(firsts), "FIFO: a later request never gets its first token earlier"
    assert firsts[2] > firsts[0], "the third waited for a prefill to finish"
    assert {r.engine for r in m.records} == {0, 1}


def test_a_full_queue_refuses_the_rest() -> None:
    s = fleet(queue_size=3).run(burst(8)).summary()
    assert s["completed"] == 5 and s["router_waited"] == 3 and s["router_shed"] == 3


def test_waiting_past_the_timeout_is_refused() -> None:
    # 10,000-token prompts prefill in two ~100 ms chunks: the waiters' 50 ms run out first.
    s = fleet(queue_size=8, queue_timeout=0.05).run(burst(6, isl=10_000)).summary()
    assert s["completed"] == 2 and s["router_waited"] == 4 and s["router_timeouts"] == 4


def test_closed_loop_refused_requests_free_their_connection() -> None:
    m = fleet().run(burst(8), concurrency=4)
    s = m.summary()
    assert s["completed"] + s["router_shed"] == 8 and s["completed"] >= 2


def test_bad_queue_settings() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        Fleet(FleetConfig(num_workers=1), queue_size=-1)
