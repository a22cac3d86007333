"""The round-by-round comparison of benchmarks/serving_vs_dynamo.py (in benchmarks/serving_report.py):
each Tandem row against the Dynamo row of the same round, so a machine that drifts between rounds
does not decide the verdict."""

from __future__ import annotations

from typing import Any

from benchmarks.referee_raw import raw_series
from benchmarks.serving_report import paired, pooled, round_interval, tandem_dynamo_pairs


def _round(ttft_p50: float, ttft_p99: float = 60.0) -> dict[str, Any]:
    return {"ttft_ms": {"p50": ttft_p50, "p99": ttft_p99}, "itl_ms": {"p50": 5.8, "p99": 6.4}}


def test_differences_are_taken_within_a_round() -> None:
    # Round 2 ran on a slower machine for both: Tandem is 2 ms ahead in each round, although its
    # slow round is slower than Dynamo's fast one.
    runs = {
        "tandem-ll|1|16": [_round(40.0), _round(50.0), _round(41.0)],
        "dynamo-nodelay|1|16": [_round(42.0), _round(52.0), _round(43.0)],
    }
    line = paired(runs, ["tandem-ll", "dynamo-nodelay"], [16]).splitlines()[-1]
    assert line.startswith("  c=16 tandem-ll - dynamo-nodelay: ")
    assert "TTFT p50 -2.00 (3/3 at or under, -2.00..-2.00)" in line
    assert "TTFT p99 +0.00 (3/3 at or under, +0.00..+0.00)" in line


def test_a_round_behind_is_counted() -> None:
    runs = {
        "tandem-ll|1|64": [_round(90.0), _round(99.0)],
        "dynamo-nodelay|1|64": [_round(95.0), _round(94.0)],
    }
    line = paired(runs, ["tandem-ll", "dynamo-nodelay"], [64]).splitlines()[-1]
    assert "TTFT p50 +0.00 (1/2 at or under, -5.00..+5.00)" in line


def test_nothing_to_pair_prints_nothing() -> None:
    assert paired({"tandem-ll|1|16": [_round(40.0)]}, ["tandem-ll"], [16]) == ""


def test_a_tagged_dynamo_row_is_compared_with_its_untagged_twin() -> None:
    # `dynamo-nodelay#aa` runs the same deployment again: an A/A row, paired like a Tandem row.
    systems = ["tandem-ll", "dynamo-nodelay", "dynamo-nodelay#aa"]
    assert tandem_dynamo_pairs(systems) == [
        ("tandem-ll", "dynamo-nodelay"),
        ("dynamo-nodelay#aa", "dynamo-nodelay"),
    ]
    runs = {
        "tandem-ll|1|16": [_round(40.0)],
        "dynamo-nodelay|1|16": [_round(42.0)],
        "dynamo-nodelay#aa|1|16": [_round(42.5)],
    }
    lines = paired(runs, systems, [16]).splitlines()
    assert "c=16 dynamo-nodelay#aa - dynamo-nodelay: TTFT p50 +0.50 (0/1 at or under" in lines[-1]


def test_pooled_percentiles_take_every_rounds_requests_together() -> None:
    # Two rounds of 100 requests each. Tandem's slow tail (20 requests at 90 ms) sits in round 1;
    # per round its p99 would be 90 then 50, pooled it is 90: 20 of 200 requests are that slow.
    tandem = [
        {"ttft_ms": [40.0] * 80 + [90.0] * 20, "itl_ms": [6.0] * 100},
        {"ttft_ms": [50.0] * 100, "itl_ms": [6.0] * 100},
    ]
    dynamo = [
        {"ttft_ms": [45.0] * 100, "itl_ms": [6.5] * 100},
        {"ttft_ms": [45.0] * 99 + [70.0], "itl_ms": [6.5] * 100},
    ]
    raws = {"tandem-ll|1|16": tandem, "dynamo-nodelay|1|16": dynamo}
    out = pooled(raws, ["tandem-ll", "dynamo-nodelay"], [1.0], [16])
    line = out.splitlines()[-1]
    assert line.startswith("  x1 c=16 tandem-ll (200) - dynamo-nodelay (200): ")
    assert "TTFT p50 50.00 vs 45.00 (+5.00)" in line
    assert "TTFT p99 90.00 vs 45.00 (+45.00)" in line
    assert "ITL p99 6.00 vs 6.50 (-0.50)" in line
    # Two rounds each: the interval with rounds drawn again follows each difference.
    assert "TTFT p50 50.00 vs 45.00 (+5.00) [" in line


def test_round_interval_is_as_wide_as_the_rounds_disagree() -> None:
    # Every round 3 ms apart: whatever rounds are drawn, the pooled median is 3 ms apart.
    a = [[float(40 + r + i % 5) for i in range(200)] for r in range(4)]
    b = [[x - 3.0 for x in rnd] for rnd in a]
    lo, hi = round_interval(a, b, 50.0)
    assert (round(lo, 6), round(hi, 6)) == (3.0, 3.0)
    # A/A with rounds that drift (the machine, or the regime a deployment fell into): the pooled
    # difference of one draw can be several ms, but the interval straddles 0.
    shifts_a, shifts_b = [0.0, 6.0, 1.0, 4.0], [5.0, 0.5, 3.0, 2.0]
    a = [[40.0 + s + i % 7 for i in range(300)] for s in shifts_a]
    b = [[40.0 + s + i % 7 for i in range(300)] for s in shifts_b]
    lo, hi = round_interval(a, b, 50.0)
    assert lo < 0.0 < hi
    assert hi - lo > 2.0


def test_referee_raw_series_match_the_referees_definitions() -> None:
    # TTFT to the first content chunk; ITL (last - first) / (n - 1); failed requests left out.
    records = [
        {"t0": 1.0, "times": [1.020, 1.026, 1.032], "err": None},
        {"t0": 2.0, "times": [2.030], "err": None},
        {"t0": 3.0, "times": [], "err": "HTTP 503"},
    ]
    raw = raw_series(records)
    assert [round(x, 6) for x in raw["ttft_ms"]] == [20.0, 30.0]
    assert [round(x, 6) for x in raw["itl_ms"]] == [6.0]
