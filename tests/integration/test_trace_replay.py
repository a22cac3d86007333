"""Replaying the Mooncake conversation trace through the fleet simulator (virtual clock, CPU)."""

from __future__ import annotations

import pytest

from tandem.bench.traces import default_trace_dir
from tandem.sim.replay import run_replay

pytestmark = pytest.mark.skipif(
    not (default_trace_dir() / "mooncake_conversation_trace.jsonl").is_file(),
    reason="shared traces not present",
)


def test_short_replay_reports_sane_metrics() -> None:
    s = run_replay(workers=2, router="round-robin", limit=300, length_divisor=8)
    assert s["completed"] == 300
    assert 0.0 < s["hit_rate"] < 0.5
    assert 0 < s["ttft_p50_ms"] <= s["ttft_p90_ms"] <= s["ttft_p99_ms"]
    assert 1.0 <= s["itl_p50_ms"] <= s["itl_p99_ms"]
    assert s["e2e_p50_ms"] >= s["ttft_p50_ms"]
    assert s["duration_s"] > 100  # the first 300 requests span ~141 s of trace time
    assert s["wall_s"] < 30


def test_all_routers_replay() -> None:
    for router in ("round-robin", "random", "least-loaded"):
        s = run_replay(workers=3, router=router, limit=100, length_divisor=16)
        assert s["completed"] == 100, router


@pytest.mark.slow
def test_full_trace_four_workers() -> None:
    s = run_replay(workers=4, router="round-robin")
    print(
        f"\nfull Mooncake replay, 4 workers round-robin: wall {s['wall_s']:.1f} s,"
        f" hit {100 * s['hit_rate']:.2f} %,"
        f" TTFT p50/p90/p99 {s['ttft_p50_ms']:.0f}/{s['ttft_p90_ms']:.0f}/{s['ttft_p99_ms']:.0f} ms,"
        f" ITL p50 {s['itl_p50_ms']:.2f} ms"
    )
    assert s["completed"] == 12031
    assert s["hit_rate"] > 0
