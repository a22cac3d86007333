"""benchmarks/c1_tails.py sorts late tokens by whether the stream made the time up afterwards."""

from __future__ import annotations

import pytest

from benchmarks.c1_tails import tails

STEP = 0.005  # s


def _stream(shifts: dict[int, float] | None = None, n: int = 50) -> list[float]:
    """Sent at -20 ms; token k arrives at k steps, plus shifts[k] seconds (a late token, a burst
    after it)."""
    shifts = shifts or {}
    return [-0.020] + [k * STEP + shifts.get(k, 0.0) for k in range(n)]


def test_a_steady_stream_has_no_late_tokens() -> None:
    t = tails([_stream() for _ in range(5)], late_ms=3.0)
    assert t.step_ms == pytest.approx(5.0)
    assert t.ttft_ms == [pytest.approx(20.0)] * 5
    assert (t.engine, t.delivery, t.last) == ([], [], [])
    assert max(t.excess_ms) == pytest.approx(0.0, abs=1e-9)


def test_a_stalled_engine_loses_the_stall_less_the_step_it_had_queued() -> None:
    # Token 10 is 15 ms late; token 11 comes right after it (the one queued step ran), and every
    # token after that keeps the late pace: the stream ends 10 ms late.
    stalled = _stream({k: 0.010 for k in range(11, 50)} | {10: 0.015})
    t = tails([_stream() for _ in range(20)] + [stalled], late_ms=3.0)
    assert t.engine == [pytest.approx(10.0)]
    assert t.delivery == [] and t.last == []
    assert max(t.excess_ms) == pytest.approx(10.0)


def test_a_late_delivery_that_catches_up_costs_the_stream_nothing() -> None:
    # Token 10 is 12 ms late, tokens 11 and 12 arrive with it: the engine kept its pace.
    burst = _stream({10: 0.012, 11: 0.007, 12: 0.002})
    t = tails([_stream() for _ in range(20)] + [burst], late_ms=3.0)
    assert t.delivery == [pytest.approx(12.0)]
    assert t.engine == []
    assert max(t.excess_ms) == pytest.approx(0.0, abs=1e-9)


def test_a_late_last_token_is_counted_apart() -> None:
    t = tails([_stream() for _ in range(20)] + [_stream({49: 0.004})], late_ms=3.0)
    assert t.last == [pytest.approx(4.0)]
    assert t.engine == [] and t.delivery == []
