"""Percentile, TPOT and goodput arithmetic of the benchmark report, on hand-made timings."""

from __future__ import annotations

import pytest

from tandem.bench.loadgen import Job, poisson_arrivals, synthetic_jobs
from tandem.bench.report import RequestRecord, Slo, format_table, percentile, summarize


def _rec(start: float, ttft: float, gap: float, n: int, error: str | None = None) -> RequestRecord:
    times = [start + ttft + i * gap for i in range(n)]
    end = (times[-1] if times else start) + 0.001
    return RequestRecord(t_start=start, t_end=end, chunk_times=times, output_tokens=n, error=error)


@pytest.mark.parametrize(
    ("values", "p", "want"),
    [
        ([], 50, None),
        ([7.0], 99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 90, 3.7),  # unsorted input; rank 2.7 between 3 and 4
        (list(range(101)), 99, 99.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], p: float, want: float | None) -> None:
    got = percentile(values, p)
    assert got == pytest.approx(want) if want is not None else got is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_excludes_the_first_token() -> None:
    r = _rec(0.0, ttft=0.5, gap=0.02, n=11)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.02)
    assert _rec(0.0, 0.5, 0.02, 1).tpot is None


def test_goodput_counts_requests_meeting_both_slos() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    records = [
        _rec(0.0, 0.2, 0.01, 10),  # good
        _rec(0.0, 0.2, 0.01, 10),  # good
        _rec(0.0, 1.5, 0.01, 10),  # TTFT too slow
        _rec(0.0, 0.2, 0.08, 10),  # TPOT too slow
        _rec(0.0, 0.2, 0.01, 1),  # one token: judged on TTFT only -> good
        _rec(0.0, 0.2, 0.01, 0, error="HTTP 503"),  # failed: never good
    ]
    rep = summarize(records, slo)
    window = max(r.t_end for r in records) - 0.0
    assert rep["requests"] == 6 and rep["completed"] == 5 and rep["errors"] == 1
    assert rep["first_error"] == "HTTP 503"
    assert rep["good_requests"] == 3
    assert rep["goodput_fraction"] == pytest.approx(0.5)
    assert rep["goodput_req_per_s"] == pytest.approx(3 / window, abs=0.01)
    assert rep["req_per_s"] == pytest.approx(5 / window, abs=0.01)
    assert rep["slo_met"] is False
    assert "SLO missed" in format_table(rep)


def test_summary_latencies_and_throughput() -> None:
    # 4 requests back to back, each 0.1 s TTFT then 9 gaps of 10 ms (10 tokens).
    records = [_rec(i * 0.2, 0.1, 0.01, 10) for i in range(4)]
    rep = summarize(records, Slo())
    assert rep["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert rep["itl_ms"]["p99"] == pytest.approx(10.0)
    assert rep["tpot_ms"]["mean"] == pytest.approx(10.0)
    assert rep["e2e_ms"]["p50"] == pytest.approx(191.0)
    assert rep["chunks_per_request_mean"] == 10
    assert rep["output_tok_per_s"] == pytest.approx(40 / rep["duration_s"], abs=0.1)
    assert rep["slo_met"] is True and rep["goodput_fraction"] == 1.0


def test_empty_run_has_no_rates() -> None:
    rep = summarize([], Slo())
    assert rep["req_per_s"] == 0 and rep["goodput_fraction"] is None and rep["slo_met"] is False


def test_synthetic_jobs_are_exact_and_deterministic() -> None:
    a = synthetic_jobs(5, 100, 50, vocab=(100, 512), seed=1)
    assert a == synthetic_jobs(5, 100, 50, vocab=(100, 512), seed=1)
    assert all(len(j.prompt) == 100 and j.max_tokens == 50 for j in a)
    assert all(100 <= t < 512 for j in a for t in j.prompt)
    assert len({tuple(j.prompt) for j in a}) == 5


def test_poisson_arrivals_have_the_requested_rate() -> None:
    jobs = poisson_arrivals([Job([1], 1)] * 4000, rate=50.0, seed=3)
    times = [j.arrival_s for j in jobs]
    assert times[0] == 0.0 and times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(50.0, rel=0.05)
