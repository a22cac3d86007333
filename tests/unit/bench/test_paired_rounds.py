"""The round-by-round comparison of benchmarks/serving_vs_dynamo.py (in benchmarks/serving_report.py):
each Tandem row against the Dynamo row of the same round, so a machine that drifts between rounds
does not decide the verdict."""

from __future__ import annotations

from typing import Any

from benchmarks.serving_report import paired, tandem_dynamo_pairs


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
