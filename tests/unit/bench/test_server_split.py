"""The TTFT split by the server's own timing (`tandem bench --server-timing`,
`tandem.bench.report._server_split`) and its use in benchmarks/ttft_split.py."""

from __future__ import annotations

import pytest

from benchmarks.ttft_split import parts
from tandem.bench.report import RequestRecord, summarize


def _record(t_start: float, ttft_s: float, server: dict[str, float] | None, sent_ms: float) -> RequestRecord:
    rec = RequestRecord(t_start=t_start, t_end=t_start + 1.0, output_tokens=2, server=server)
    rec.chunk_times = [t_start + ttft_s, t_start + ttft_s + 0.005]
    rec.sent_unix_ms = sent_ms
    return rec


def test_the_client_ttft_splits_into_outside_intake_and_first_token() -> None:
    # Client TTFT 25 ms; the server saw 21 ms of it (1 ms intake, 20 ms to the first token) and got
    # the request 3 ms after it was sent: 4 ms outside, 3 of them on the way in.
    # Of the 20 ms, the engine took 18.5 (Tandem's engine_ttft_ms): 1.5 ms request plane.
    timing = {"request_received_ms": 1_000_003, "prefill_wait_time_ms": 1.0, "prefill_time_ms": 20.0}
    timing.update(ttft_ms=21.0, engine_ttft_ms=18.5)
    rep = summarize([_record(10.0, 0.025, timing, 1_000_000.0), _record(11.0, 0.025, timing, 1_000_000.0)])
    split = rep["server"]
    assert split["requests"] == 2
    assert split["ttft_ms"]["p50"] == pytest.approx(21.0)
    assert split["outside_ms"]["mean"] == pytest.approx(4.0)
    assert split["way_in_ms"]["mean"] == pytest.approx(3.0)
    assert split["intake_ms"]["p50"] == pytest.approx(1.0)
    assert split["dispatch_to_first_ms"]["p99"] == pytest.approx(20.0)
    assert split["engine_ms"]["p50"] == pytest.approx(18.5)
    assert split["plane_ms"]["mean"] == pytest.approx(1.5)


def test_requests_without_a_timing_are_left_out_and_none_gives_none() -> None:
    timing = {"request_received_ms": 5, "prefill_wait_time_ms": 1.0, "prefill_time_ms": 2.0, "ttft_ms": 3.0}
    rep = summarize([_record(0.0, 0.010, timing, 4.0), _record(1.0, 0.010, None, 0.0)])
    assert rep["server"]["requests"] == 1
    assert rep["server"]["engine_ms"]["mean"] is None  # a server without engine times (Dynamo)
    assert summarize([_record(0.0, 0.010, None, 0.0)])["server"] is None


def test_the_engine_time_splits_first_token_time_for_tandem_only() -> None:
    def dist(mean: float | None) -> dict[str, float | None]:
        return {"mean": mean, "p50": mean}

    server = {
        "outside_ms": dist(4.0),
        "way_in_ms": dist(3.0),
        "intake_ms": dist(0.5),
        "dispatch_to_first_ms": dist(35.5),
        "engine_ms": dist(33.0),
        "plane_ms": dist(2.5),
    }
    report = {"ttft_ms": {"mean": 40.0, "p50": 39.0}, "server": server}
    got = parts(report, "p50")
    assert got["->first"] == 35.5 and got["engine"] == 33.0 and got["plane"] == 2.5
    dynamo = {**report, "server": {**server, "engine_ms": dist(None), "plane_ms": dist(None)}}
    assert "engine" not in parts(dynamo, "mean")
